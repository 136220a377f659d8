"""One thin module per subcommand: parse options, call one library function, report."""
