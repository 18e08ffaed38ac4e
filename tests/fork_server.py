"""A fork server for the README test's `fluxexport …` commands: `python tests/fork_server.py SOCKET`.

A `fluxexport` command spends ~4–5 s of its ~6 s on a tiny model importing torch, diffusers and transformers. This
process imports fluxexport's CLI and the libraries its commands load once, runs nothing else (no torch op, no
thread: forking is then safe), and forks one child per request: the child takes the request's folder, environment,
argv and output files, runs the console script's `main()` as `fluxexport` would, and exits with its exit code.
What differs from a fresh `fluxexport` process is only that the imports are already done.

Protocol: one JSON line per request on the Unix socket (`argv`, `cwd`, `env`, `stdout`, `stderr`: file paths),
one JSON line back (`returncode`, `cpu`: the child's CPU seconds). One request at a time.
"""

from __future__ import annotations

import json
import os
import socket
import sys


def preload() -> None:
    """What `fluxexport` commands import on a tiny model, imported once here."""
    import diffusers  # noqa: F401
    import onnxruntime  # noqa: F401
    import transformers  # noqa: F401

    import fluxexport.cli  # noqa: F401
    from fluxexport.console import quiet_libraries

    quiet_libraries()
    from diffusers import (  # noqa: F401 - the pipelines' modules pull in the model classes they use
        Flux2KleinPipeline,
        Flux2Pipeline,
        FluxControlPipeline,
        FluxFillPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxPriorReduxPipeline,
    )


def run_child(request: dict) -> None:
    """In the forked child: become `fluxexport ARGS` in the request's folder, environment and files; never
    returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = list(request["argv"])
        from fluxexport.cli import main

        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
    except BaseException:  # as python would: the traceback on stderr, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        with connection, connection.makefile("rw") as stream:
            line = stream.readline()
            if not line:
                continue
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                run_child(request)
            _, status, usage = os.wait4(pid, 0)
            reply = {"returncode": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime}
            stream.write(json.dumps(reply) + "\n")
            stream.flush()


if __name__ == "__main__":
    serve(sys.argv[1])
