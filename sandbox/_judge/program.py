"""The program's process: forked by the judge with its own process group, stdio pipes and rlimits, it runs the
program as `__main__` (program runs) or loads it and answers the tests' calls with plain data (assert tests)."""

import atexit
import builtins
import marshal
import os
import resource
import sys
import types

from .frames import encode_frame, read_frame, write_all

# A program that dies of MemoryError exits with this code, so the verdict can say "memory" (faking it only
# turns a run into a failure, so it needs no protection).
MEMORY_EXIT_CODE = 86
# The judge's own process counts against the uid's process limit too.
JUDGE_TASKS = 1


def close_fds_except(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def apply_limits(limits: dict) -> None:
    cpu = int(limits["timeout"]) + 1
    mib = 1 << 20
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_mb"] * mib),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_NPROC, limits["processes"] + JUDGE_TASKS + 1),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mib),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))


def spawn(limits: dict, stdin_fd: int, keep: tuple[int, ...] = ()) -> tuple[int, int, int]:
    """Fork the program's process: its own process group, fresh stdio pipes, only `keep` fds, rlimits.
    Returns (pid, stdout read end, stderr read end) in the judge and (0, -1, -1) in the child."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(out_w)
        os.close(err_w)
        return pid, out_r, err_r
    try:
        os.setpgid(0, 0)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        close_fds_except(keep)
        apply_limits(limits)
    except BaseException:
        os._exit(127)
    return 0, -1, -1


def load_program(source: str, workdir: str) -> types.ModuleType:
    """Run the program as `__main__` of a fresh module, from solution.py in its working directory."""
    path = os.path.join(workdir, "solution.py")
    with open(path, "w", encoding="utf-8") as file:
        file.write(source)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [path]
    sys.path[0] = workdir
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def print_program_error(exc: BaseException) -> None:
    try:
        import traceback  # only on this error path, in the program's process

        # Skip the judge's own frame so the traceback starts in the program.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    except BaseException:  # no memory or no free fd left to import traceback: say at least what it was
        try:
            line = f"{type(exc).__name__}: {exc}\n"
        except BaseException:
            line = type(exc).__name__ + "\n"
        os.write(2, line.encode(errors="replace"))


def finish(code: int) -> None:
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)


def run_as_main(source: str, workdir: str) -> None:
    """Child side of a plain or stdin/stdout run: behave like `python solution.py`."""
    code = 0
    try:
        load_program(source, workdir)
    except SystemExit as exc:
        code = exit_status(exc.code)
    except MemoryError as exc:
        code = MEMORY_EXIT_CODE
        print_program_error(exc)
    except BaseException as exc:
        print_program_error(exc)
        code = 1
    finish(code)


def describe_exports(module: types.ModuleType) -> list:
    """The program's top-level names as the tests will see them: functions become remote calls, plain values
    are copied, modules are re-imported on the judge's side."""
    exports = []
    for name, value in list(vars(module).items()):
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            exports.append(("module", name, value.__name__))
        elif callable(value):
            exports.append(("call", name, None))
        else:
            try:
                marshal.dumps(value)
            except ValueError:
                continue
            exports.append(("value", name, value))
    return exports


def serve_calls(source: str, workdir: str, requests: int, replies: int) -> None:
    """Child side of an assert-test run: load the program, then answer calls with plain data until EOF."""
    try:
        module = load_program(source, workdir)
    except SystemExit as exc:
        finish(exit_status(exc.code))
    except MemoryError as exc:
        print_program_error(exc)
        finish(MEMORY_EXIT_CODE)
    except BaseException as exc:
        print_program_error(exc)
        finish(1)
    write_all(replies, encode_frame(("ready", describe_exports(module))))
    while (request := read_frame(requests)) is not None:
        name, args, kwargs = request
        try:
            value = vars(module)[name](*args, **kwargs)
            try:
                reply = marshal.dumps(("ok", value))
            except ValueError:
                reply = marshal.dumps(
                    ("raise", "TypeError", f"{name}() returned {type(value).__name__}, not plain data")
                )
        except BaseException as exc:
            try:
                message = str(exc)[:2000]
            except BaseException:
                message = "<unprintable>"
            reply = marshal.dumps(("raise", type(exc).__name__, message))
        sys.stdout.flush()
        write_all(replies, len(reply).to_bytes(4, "little") + reply)
    finish(0)
