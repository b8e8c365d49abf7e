"""The command line: parses, calls db/ and runner/, prints. Domain errors become one-line messages here."""
