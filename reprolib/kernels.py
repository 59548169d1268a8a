"""Stage kernels forked from a warm process.

Every stage runs its notebook in a fresh kernel. Starting Python and importing torch, transformers and the
model code costs about 8 s of a 2-core machine, a third of the quickstart's time. So `run_pipeline` starts
one *zygote* per run, which does those imports once, and each stage's kernel is a fork of it: a new process
(nothing leaks from one notebook into the next) whose imports are already done.

Starting the next stage's kernel ahead of time would not do: on 2 cores its imports slow the running stage's
torch threads more than they save, and the priorities that could prevent that (nice, SCHED_IDLE) do not cross
the separate session jupyter_client gives each kernel.

jupyter_client launches, signals and kills one process per kernel. Here that process is a small proxy
(`python -m reprolib.kernels proxy ...`): it asks the zygote for a kernel, forwards interrupts to it and
exits when it ends. The proxy holds one end of a socket and the kernel the other, so each notices when the
other is gone. The kernel is the zygote's child, not the proxy's, so the proxy asks the zygote how it ended and
writes a kernel killed by a signal (the out-of-memory killer's SIGKILL) or exiting with an error status to the
stage's kernel.log, where the pipeline's error message reads it. Where the zygote cannot serve (not Linux, or it
died), the proxy becomes an ordinary kernel.
"""
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# What the zygote imports: the heavy third-party modules nearly every notebook imports first. Not reprolib's
# own (they import in a fraction of a second): a kernel must run the library as it is when its stage starts,
# also when someone edits it during a long run.
WARM_MODULES = ("torch", "transformers.modeling_utils", "transformers.models.bert.modeling_bert",
                "transformers.models.bert.tokenization_bert", "transformers.models.t5.modeling_t5",
                "matplotlib.pyplot", "accelerate", "faiss", "ir_measures", "ipykernel.kernelapp")


def start_zygote():
    """A Zygote where kernels can be forked (Linux, unless REPROLIB_FORK_KERNELS=0), else None: kernels then
    start the usual way."""
    if not sys.platform.startswith("linux") or os.environ.get("REPROLIB_FORK_KERNELS") == "0":
        return None
    return Zygote()


KERNEL_LOG = "kernel.log"   # in the stage folder (the kernel's working directory)
KERNEL_END_PREFIX = "reprolib: the kernel "   # starts the line the proxy adds to KERNEL_LOG when its kernel dies


class Zygote:
    """The warm process of one pipeline run; `kernel_manager_class` makes papermill's kernels forks of it."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="reprolib-zygote-")
        self.socket_path = os.path.join(self._dir.name, "zygote.sock")
        # Same session as the pipeline; it exits when its stdin closes, i.e. when the pipeline does.
        from reprolib.progress import STAGE_ENVIRONMENT

        # the stage environment from the start: libraries it warms up read it at import (transformers' bars)
        self.process = subprocess.Popen([sys.executable, "-m", "reprolib.kernels", "zygote", self.socket_path],
                                        stdin=subprocess.PIPE, env={**os.environ, **STAGE_ENVIRONMENT})
        self.kernel_manager_class = _forked_kernel_manager(self.socket_path)
        # A proxy that finds no socket becomes an ordinary kernel: wait for the bind (a fraction of a second, before
        # the imports), or the first stage races it and loses whenever papermill is already imported.
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket_path) and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self):
        self.process.stdin.close()   # the zygote exits when it closes (one that died already: the pipe is freed)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()   # reaped, not left a zombie of a long-lived process (a notebook, the tests)
        self._dir.cleanup()


def _forked_kernel_manager(socket_path):
    """A KernelManager class that launches the plain Python kernel through the proxy (other kernels as usual)."""
    from jupyter_client import AsyncKernelManager

    class ForkedKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self):
            spec = super().kernel_spec
            if spec is not None and _is_this_python(spec.argv):
                spec.argv = [sys.executable, "-m", "reprolib.kernels", "proxy", socket_path, *spec.argv[3:]]
            return spec

    return ForkedKernelManager


def _is_this_python(argv):
    """Whether a kernelspec's command starts ipykernel in the interpreter running the pipeline (its "python"
    means this one, as in jupyter_client): only then can a fork of the zygote stand in for it."""
    this = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    return (len(argv) >= 3 and argv[1:3] == ["-m", "ipykernel_launcher"]
            and (argv[0] in this or _environment(argv[0]) == _environment(sys.executable)))


def _environment(python):
    """A python's folder and interpreter, links resolved: a virtual environment's python links to its base
    interpreter, which another environment (or the base python itself) shares, but not its folder."""
    return os.path.realpath(os.path.dirname(python)), os.path.realpath(python)


# ---- the zygote process ---------------------------------------------------------------------

def _serve(socket_path):
    # A Ctrl-C in the terminal, or a SIGTERM to the pipeline's process group (`timeout`, `kill -- -PGID`), is the
    # pipeline's to handle: it stops the kernels; this process goes when the pipeline closes its stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.path and sys.path[0] == os.getcwd():  # as ipykernel_launcher does: the launch directory is no package
        del sys.path[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen()  # proxies may connect now; they wait while the imports run
    threading.Thread(target=_exit_with_stdin, daemon=True).start()
    _warm_up(WARM_MODULES)
    while True:
        conn, _ = listener.accept()
        try:
            request = json.loads(conn.makefile("r").readline())
        except ValueError:  # a proxy that died before it asked
            conn.close()
            continue
        if "status_of" in request:  # a kernel has closed its socket: its proxy asks how it ended
            _reply(conn, json.dumps(_wait_status(request["status_of"])))
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            _run_kernel(conn, request)  # never returns
        _reply(conn, str(pid))


def _warm_up(modules):
    """Import `modules` once for every stage. faiss's own OpenBLAS chooses its kernels as it loads: here, as in
    require_faiss, with the kernels named (a quarter of the flat-search speed on a Sapphire Rapids Xeon otherwise)."""
    from reprolib.cpu import openblas_kernels_named

    for module in modules:
        try:
            with openblas_kernels_named() if module == "faiss" else contextlib.nullcontext():
                importlib.import_module(module)
        except Exception:  # the notebook reports it, where a student can read it
            pass


def _reply(conn, line):
    """Answer a proxy; one killed meanwhile (jupyter_client's hard shutdown) must not end the zygote."""
    try:
        conn.sendall(f"{line}\n".encode())
    except OSError:
        pass
    conn.close()


def _wait_status(pid, timeout_s=1.0):
    """The wait status of the zygote's child `pid` (which reaps it), or None when it is not known. Its socket
    has closed, so it is exiting; a kernel whose proxy was killed and never asks stays a zombie until the run
    ends and the zygote with it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def _take_the_kernels_backend(shell):
    """The zygote imported pyplot (and the inline backend) before ipykernel named its backend (MPLBACKEND, which
    matplotlib reads as it is imported), and before there was a shell to show figures in: take the backend now, as a
    fresh kernel would have, or no figure shows in the stage's notebook."""
    backend = os.environ.get("MPLBACKEND")
    if not backend or "matplotlib.pyplot" not in sys.modules:
        return
    try:
        if backend == INLINE_BACKEND:
            shell.enable_matplotlib("inline")   # what `%matplotlib inline` does: the backend and the shell's hooks
        else:
            import matplotlib.pyplot as plt

            plt.switch_backend(backend)
    except Exception as e:   # a kernel without its figures still runs its stage; kernel.log says why
        print(f"reprolib: this stage's figures will not show in its notebook ({type(e).__name__}: {e})", file=sys.stderr)


def _exit_with_stdin():
    sys.stdin.buffer.read()
    os._exit(0)


def _run_kernel(conn, request):
    """In the forked child: become the kernel the proxy asked for."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # interrupts (forwarded by the proxy) raise again
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setpgid(0, 0)  # out of the terminal's process group, as jupyter_client's own kernels are
    os.chdir(request["cwd"])
    # The kernel process's own output (not the cells': those go to the notebook) is start-up chatter and, when a
    # run is interrupted, shutdown noise: it goes to the stage's kernel.log, which a failed stage points to.
    log = os.open(KERNEL_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.clear()
    os.environ.update(request["env"])
    _set_threads(os.environ.get("OMP_NUM_THREADS"))
    # The parent ipykernel watches (and exits without) is the zygote: it is this process's parent, and it lives
    # as long as the pipeline. A parent also keeps ipykernel from printing its terminal banner.
    os.environ["JPY_PARENT_PID"] = str(os.getppid())
    sys.argv = request["argv"]
    for name in [name for name in sys.modules if name == "reprolib" or name.startswith("reprolib.")]:
        del sys.modules[name]  # the zygote's own reprolib.kernels: the stage imports the library afresh
    threading.Thread(target=_exit_with_socket, args=(conn,), daemon=True).start()
    from ipykernel.kernelapp import IPKernelApp

    status = 0
    try:
        app = IPKernelApp.instance()
        app.initialize([*request["argv"][1:], f"--IPKernelApp.parent_handle={os.getppid()}"])
        _take_the_kernels_backend(app.shell)
        app.start()
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _set_threads(value):
    """A stage's OMP_NUM_THREADS (`reprolib run --jobs`): the libraries the zygote imported read it before the
    stage set it, so their thread pools are resized here (torch's own, and OpenMP's and BLAS's)."""
    try:
        threads = int(str(value).split(",")[0])   # "4,2": OpenMP's nested form, the outer level counts
    except ValueError:
        return
    from threadpoolctl import threadpool_limits

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)   # torch's own pool; the rest are OpenMP's and BLAS's
    threadpool_limits(threads)


def _exit_with_socket(conn):
    """The proxy was killed (jupyter_client's hard shutdown): the kernel goes too."""
    while conn.recv(64):
        pass
    os._exit(1)


# ---- the proxy process (what jupyter_client launches) ---------------------------------------

def _proxy(socket_path, kernel_args):
    argv = [sys.executable, "-m", "ipykernel_launcher", *kernel_args]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
        request = {"cwd": os.getcwd(), "env": dict(os.environ), "argv": ["ipykernel_launcher", *kernel_args]}
        conn.sendall((json.dumps(request) + "\n").encode())
        reply = conn.makefile("r").readline()
        pid = int(reply)
    except (OSError, ValueError):  # no zygote: be the kernel ourselves
        conn.close()
        os.execv(sys.executable, argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: _forward(pid, signum))
    while conn.recv(64):  # until the kernel closes its end: it has exited
        pass
    _log_kernel_end(pid, _ask_status(socket_path, pid))


def _ask_status(socket_path, pid):
    """How the kernel `pid` ended (a wait status), as the zygote that forked it saw; None if it cannot say."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(socket_path)
            conn.sendall((json.dumps({"status_of": pid}) + "\n").encode())
            return json.loads(conn.makefile("r").readline())
    except (OSError, ValueError):
        return None


def _log_kernel_end(pid, status):
    """A line in the stage's kernel.log (the proxy runs in the stage folder) for a kernel that did not end well."""
    if status is None or status == 0:
        return
    try:
        with open(KERNEL_LOG, "a", encoding="utf-8") as log:
            log.write(f"{KERNEL_END_PREFIX}{describe_end(pid, os.waitstatus_to_exitcode(status))}\n")
    except OSError:
        pass


def describe_end(pid, code):
    """How a kernel process ended, from its exit code as subprocess gives it (-N: killed by signal N):
    "(pid 12) was killed by SIGKILL", "(pid 12) exited with status 3"."""
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    return f"(pid {pid}) {how}"


def _forward(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        _serve(sys.argv[2])
    elif sys.argv[1] == "proxy":
        _proxy(sys.argv[2], sys.argv[3:])
    else:
        sys.exit("usage: python -m reprolib.kernels zygote SOCKET | proxy SOCKET KERNEL_ARGS...")
