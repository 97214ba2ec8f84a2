"""Non-Lightning subcommands of ``midol`` (one module each, exposing ``main(argv) -> int``)."""
