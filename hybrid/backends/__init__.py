"""Where the compute runs: native kernels and the expert engine, NUMA placement of the
experts, the GPU bridge and graphs, torch dequantization of GGML blocks, torch experts."""
