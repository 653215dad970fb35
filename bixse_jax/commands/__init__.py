"""One module per `bixse-jax` sub-command, each with `main(argv)`; cli.py only dispatches."""
