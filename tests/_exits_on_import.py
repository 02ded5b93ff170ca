"""A module that ends the interpreter when imported: preloading it must not end the server."""

raise SystemExit(3)
