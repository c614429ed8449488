"""One module per `personalize` subcommand: `add_arguments(parser)` and `run(args) -> int`; heavy
libraries (torch, diffusers, PIL, tqdm) are imported in `run`, so building the parser stays instant."""
