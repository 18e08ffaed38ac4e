"""One library call per `fluxexport` command: typed options in, a typed result out.

The CLI parses options into the command's options dataclass, calls its one function here and renders what it
returns. Nothing here prints: progress and log lines go through callbacks the caller passes (`Progress`, `Log`).
"""
