"""The sqdf commands, one module per group, each with its parsers (``add_parsers``) and
handlers (``HANDLERS``); sqdf.cli assembles them. Every handler is a thin shell over a
library call."""
