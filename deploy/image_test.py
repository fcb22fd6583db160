"""``make image-test``: build deploy/Dockerfile and check that the image serves the demo model.

No Docker engine and no container registry run on the development machines, so the image is
built the way these machines allow (see deploy/README.md, "Built and run here"):

1. a Debian bookworm root file system made by ``mmdebstrap`` stands in for
   ``python:3.11-slim-bookworm`` (``PYTHON_IMAGE``), cached under ``.cache/image``;
2. the CPU index ``download.pytorch.org`` does not resolve here and PyPI's Linux torch is the
   CUDA build, so ``TORCH_INDEX_URL`` points at a local stand-in for the CPU index: the
   CPU wheel pip finds on this machine and its dependencies from PyPI, served on loopback
   (``--torch-index-url`` uses a real index instead);
3. ``buildah bud --isolation chroot`` builds the Dockerfile unchanged, in a storage of its own
   under ``.cache/image`` (the vfs driver, which issue 13 found to work in this sandbox);
4. ``buildah run --isolation chroot`` runs the image's entrypoint as uid 10001 on free ports
   (chroot isolation shares the host's network, so the host reaches it on loopback); the
   grpcurl examples of ``clients/grpcurl`` check health SERVING and a chat answer, and the log
   must show the native kernels the builder compiled.

Run it with the venv's interpreter (``make image-test``): grpcurl comes from the dev extra.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("QWEN_GRPC_CACHE_DIR", REPO / ".cache")) / "image"
IMAGE = "localhost/qwen-grpc:demo"
UID = "10001:10001"
# bookworm's python3 is 3.11, the Dockerfile's default base; python3-venv for `python -m venv`,
# python-is-python3 for `python`, passwd for useradd, apt for the builder's g++.
SUITE = "bookworm"
VARIANT = "apt"
PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd", "ca-certificates")
# This sandbox reaches PyPI and Debian through a TLS-intercepting proxy: the base trusts the
# host's extra CAs, and pip (bookworm's 23.0 reads only certifi's bundle) the system store.
HOST_CAS = Path("/usr/local/share/ca-certificates")
PIP_CONF = "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


def log(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def run(*command: str | Path, capture: bool = False, env: dict[str, str] | None = None) -> str:
    """Runs a command that must succeed; its output if ``capture``, else it goes to ours."""
    done = subprocess.run(
        [str(part) for part in command], check=True, text=True, capture_output=capture, env=env
    )
    return done.stdout if capture else ""


def buildah(*args: str | Path) -> list[str]:
    """A buildah command on this test's own storage, so its vfs copies never mix with other
    images on the machine and ``make clean`` removes them with the cache."""
    storage = ("--root", WORK / "storage", "--runroot", WORK / "run", "--storage-driver", "vfs")
    return ["buildah", *map(str, storage), *map(str, args)]


def ensure_tools() -> None:
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run("apt-get", "install", "-y", "-q", "buildah", "mmdebstrap", env=env)


def host_ca_files() -> list[Path]:
    return sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []


def base_key() -> str:
    """Names the cached base by everything that goes into it: a change makes a new one."""
    digest = hashlib.sha256(repr((SUITE, VARIANT, PACKAGES, PIP_CONF)).encode())
    for ca in host_ca_files():
        digest.update(ca.read_bytes())
    return digest.hexdigest()[:12]


def base_rootfs(key: str) -> Path:
    """The mmdebstrap tarball (~3.5 min the first time), written aside and renamed when whole."""
    tarball = WORK / f"rootfs-{key}.tar"
    if tarball.exists():
        return tarball
    partial = WORK / f"rootfs-{key}.partial.tar"
    hooks = []
    if host_ca_files():
        hooks += [f"--customize-hook=copy-in {HOST_CAS} /usr/local/share"]
    hooks += [
        '--customize-hook=chroot "$1" update-ca-certificates',
        f"--customize-hook=printf '{PIP_CONF}' > \"$1/etc/pip.conf\"",
    ]
    log(f"making the {SUITE} base with mmdebstrap")
    run(
        "mmdebstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(PACKAGES)}",
        *hooks,
        SUITE,
        partial,
    )
    partial.rename(tarball)
    return tarball


def image_exists(name: str) -> bool:
    found = subprocess.run(buildah("inspect", "--type", "image", name), capture_output=True)
    return found.returncode == 0


def base_image(key: str) -> str:
    """``FROM scratch`` + the rootfs: what ``PYTHON_IMAGE`` names in the build."""
    name = f"localhost/qwen-grpc-base:{key}"
    if image_exists(name):
        return name
    context = WORK / f"base-{key}"
    context.mkdir(parents=True, exist_ok=True)
    rootfs = context / "rootfs.tar"
    if not rootfs.exists():
        os.link(base_rootfs(key), rootfs)
    (context / "Containerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["python3"]\n')
    run(*buildah("bud", "--isolation", "chroot", "-t", name, context))
    return name


def torch_pin() -> str:
    """``torch==X`` from pyproject.toml, the pin the Dockerfile installs (a test keeps them equal)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return next(dep for dep in project["dependencies"] if dep.startswith("torch=="))


def normalized(wheel: Path) -> str:
    """The project name of a wheel as a PEP 503 index spells it."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def torch_index_tree() -> Path:
    """A folder with ``simple/<project>/<wheel>`` for torch's CPU build and its dependencies.

    ``pip download`` of ``torch==X+cpu`` takes the CPU wheel that this machine's pip finds
    (``make install`` installs the same one) and the dependencies from PyPI.
    """
    root = WORK / "torch-index"
    wheels = root / "wheels"
    pin = f"{torch_pin()}+cpu"
    log(f"collecting {pin} and its dependencies")
    run(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", wheels, pin)
    simple = root / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    for wheel in wheels.glob("*.whl"):
        project = simple / normalized(wheel)
        project.mkdir(parents=True, exist_ok=True)
        os.link(wheel, project / wheel.name)
    return root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Keeps pip's requests out of the build's output; pip reports what it downloads."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serves ``directory`` on a free loopback port; http.server's listings are PEP 503 pages.
    The build's RUN steps share the host's network (chroot isolation), so they reach it."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def build(base: str, torch_index_url: str) -> float:
    """Builds the Dockerfile as it is; returns the seconds it took."""
    if image_exists(IMAGE):
        run(*buildah("rmi", "--force", IMAGE))
    started = time.monotonic()
    run(
        *buildah(
            "bud",
            "--isolation",
            "chroot",
            "-f",
            REPO / "deploy" / "Dockerfile",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--build-arg",
            f"TORCH_INDEX_URL={torch_index_url}",
            "-t",
            IMAGE,
            REPO,
        )
    )
    seconds = time.monotonic() - started
    # The builder and model stages stay behind as untagged images; only the runtime is kept.
    run(*buildah("rmi", "--prune"), capture=True)
    return seconds


def image_size() -> str:
    """The runtime image's uncompressed size as buildah (and ``docker images``) shows it."""
    listing = run(*buildah("images", "--json", IMAGE), capture=True)
    size: str = json.loads(listing)[0]["size"]
    return size


def entrypoint() -> list[str]:
    # buildah 1.28's --format has no `json` function: read the whole inspect document.
    inspected = json.loads(run(*buildah("inspect", "--type", "image", IMAGE), capture=True))
    command: list[str] = inspected["OCIv1"]["config"]["Entrypoint"]
    return command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def grpcurl_example(script: str, target: str, *args: str) -> list[dict[str, object]]:
    """One clients/grpcurl example, with the venv's grpcurl as the tests run it."""
    env = dict(os.environ, QWEN_GRPC_TARGET=target)
    env.pop("GRPCURL", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(
        [REPO / "clients" / "grpcurl" / script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed: {done.stderr.strip()}")
    return json_stream(done.stdout)


def json_stream(text: str) -> list[dict[str, object]]:
    """grpcurl prints one pretty JSON object per response message, back to back."""
    decoder = json.JSONDecoder()
    objects: list[dict[str, object]] = []
    index = 0
    while True:
        index = len(text) - len(text[index:].lstrip())  # past the blanks between objects
        if index == len(text):
            return objects
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)


def listener_pid(port: int) -> int:
    """The host pid of the process listening on ``port``: the server inside the container."""
    listing = run("ss", "-Hltnp", f"sport = :{port}", capture=True)
    pid = re.search(r"pid=(\d+)", listing)
    if pid is None:
        raise RuntimeError(f"nothing listens on {port}: {listing!r}")
    return int(pid.group(1))


def real_uid(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    assert uid is not None, status
    return uid.group(1)


def no_compiler_in_image(container: str) -> None:
    """The runtime stage must load the builder's kernels, not compile its own."""
    probe = run(
        *buildah(
            "run",
            "--isolation",
            "chroot",
            container,
            "--",
            "sh",
            "-c",
            "command -v c++ g++ gcc cc || true",
        ),
        capture=True,
    ).strip()
    if probe:
        raise RuntimeError(f"the runtime image has a compiler: {probe}")


def wait_serving(server: subprocess.Popen[str], target: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(RuntimeError):
            if grpcurl_example("health.sh", target, "qwen.chat.v1.ChatService") == [
                {"status": "SERVING"}
            ]:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not SERVING after {START_TIMEOUT_S:.0f} s:\n{tail(log_path)}")
        time.sleep(1.0)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def kernel_line(log_path: Path) -> str:
    """The server's log line naming the q8 path; it must be the builder's prebuilt library."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "q8 kernels:" in line:
            message: str = json.loads(line)["message"]
            if "native" not in message or "prebuilt in /opt/qwen-grpc/cache" not in message:
                raise RuntimeError(f"the image does not run the builder's kernels: {message}")
            return message
    raise RuntimeError(f"the server never said which q8 kernels run:\n{tail(log_path)}")


def run_check() -> float:
    """Runs the entrypoint as uid 10001 and checks it; returns seconds to the chat answer."""
    container = run(*buildah("from", "--pull-never", IMAGE), capture=True).strip()
    try:
        no_compiler_in_image(container)
        port, metrics_port = free_port(), free_port()
        log_path = WORK / "server.log"
        # 127.0.0.1, not the image's 0.0.0.0: the host's network namespace is shared, so all
        # interfaces would expose the test server beyond this machine.
        command = [
            *entrypoint(),
            *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)),
        ]
        log(f"running {' '.join(command)} as {UID}")
        started = time.monotonic()
        with log_path.open("w") as server_log:
            server = subprocess.Popen(
                buildah("run", "--isolation", "chroot", "--user", UID, container, "--", *command),
                stdout=server_log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            wait_serving(server, f"127.0.0.1:{port}", log_path)
            check_chat(f"127.0.0.1:{port}")
            seconds = time.monotonic() - started
            check_process(listener_pid(port), log_path)
            stop(server, listener_pid(port))
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    finally:
        run(*buildah("rm", container), capture=True)
    return seconds


def check_chat(target: str) -> None:
    (answer,) = grpcurl_example("chat.sh", target)
    content = str(answer["message"]["content"])  # type: ignore[index]
    if "Paris" not in content:
        raise RuntimeError(f"the demo model answered {content!r}")
    log(f"chat answered {content!r}")


def check_process(pid: int, log_path: Path) -> None:
    """The server runs as the image's unprivileged user, on the builder's native kernels."""
    uid = real_uid(pid)
    if uid != UID.split(":")[0]:
        raise RuntimeError(f"the server runs as uid {uid}")
    log(f"server pid {pid} runs as uid {uid}; {kernel_line(log_path)}")


def stop(server: subprocess.Popen[str], pid: int) -> None:
    """SIGTERM to the server itself (the image's STOPSIGNAL): it must drain and exit 0."""
    os.kill(pid, signal.SIGTERM)
    code = server.wait(timeout=STOP_TIMEOUT_S)
    if code != 0:
        raise RuntimeError(f"the container exited with {code} on SIGTERM")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-index-url", help="a real CPU index instead of the local stand-in")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_tools()
    key = base_key()
    base = base_image(key)
    with contextlib.ExitStack() as stack:
        index = args.torch_index_url or (
            stack.enter_context(serve_directory(torch_index_tree())) + "/simple"
        )
        build_s = build(base, index)
    size = image_size()
    log(f"built {IMAGE} in {build_s:.0f} s, {size}")
    run_s = run_check()
    cpu = next(
        line.partition(":")[2].strip()
        for line in run("lscpu", capture=True).splitlines()
        if line.startswith("Model name")
    )
    log(f"PASSED: build {build_s:.0f} s, run check {run_s:.0f} s, image {size}, {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
