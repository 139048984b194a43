// Routed-expert engine (see moe.h).
