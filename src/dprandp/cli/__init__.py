"""The ``dprandp`` command line: one module per subcommand, each exposing ``command``."""
