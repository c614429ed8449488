"""One module per `personalize` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
