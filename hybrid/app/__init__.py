"""User-facing programs: the `hybrid-run` command line, terminal chat, HTTP server, demo."""
