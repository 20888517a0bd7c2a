"""Enterprise Gateway's remote kernel launcher for kernelvisor (python -m kernelvisor.eg_launcher).

Enterprise Gateway (EG) starts remote kernels (ssh to a host, a Kubernetes pod, a YARN container)
through a launcher that speaks its contract (EG's ``docs/source/developers/kernel-launcher.md``):

1. pick the five kernel ports and a *communication port* inside ``--port-range`` and write the
   connection info;
2. send the connection info, with ``pid``, ``pgid``, ``comm_port`` and ``kernel_id``, to
   ``--response-address``: AES-encrypted (EG's format: AES-128-ECB, PKCS#7 padding) with a fresh
   key that is itself encrypted with EG's RSA ``--public-key`` (PKCS#1 v1.5), base64 JSON;
3. start the kernel: here the kernelvisor binary (the supervisor), as EG's R launcher starts R;
4. serve the communication port: ``{"signum": n}`` sends signal n to the kernel (0: a liveness
   poll), ``{"shutdown": 1}`` ends the kernel and the launcher.

The launcher is the process EG knows (``pid``/``pgid``): the supervisor runs in its process group
and the launcher exits when the supervisor does, which closes the communication port, which EG
reads as "the kernel is gone". The launcher ignores SIGINT itself, so an interrupt sent to the
group reaches the supervisor exactly once. Arguments may also come from the environment
(``KERNEL_ID``, ``RESPONSE_ADDRESS``, ``PUBLIC_KEY``, ``PORT_RANGE``; ``EG_``-prefixed too), as in
EG's kernel images. Arguments after ``--`` go to the kernelvisor binary (e.g. ``--backend trio``).
Needs ``cryptography`` (kernelvisor's ``eg`` extra).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernelvisor.__main__ import find_binary

log = logging.getLogger("kernelvisor.eg_launcher")

#: The payload format EG's response manager decodes (its ``version`` field).
PAYLOAD_VERSION = 1
#: The five Jupyter channels, in the order their ports are picked.
CHANNELS = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
#: The largest request accepted on the communication port.
MAX_REQUEST = 64 * 1024
#: How long the supervisor gets to exit by itself after ``{"shutdown": 1}``, then after SIGTERM.
SHUTDOWN_GRACE = 5.0


@dataclass(frozen=True)
class PortRange:
    """``lower..upper``; ``0..0`` means any free port."""

    lower: int
    upper: int

    @classmethod
    def parse(cls, text: str | None, min_size: int) -> PortRange:
        """Parses EG's ``L..U``; a non-empty range must span at least ``min_size`` ports
        (EG_MIN_PORT_RANGE_SIZE, as EG's own launchers require)."""
        if not text:
            return cls(0, 0)
        lower_s, sep, upper_s = text.partition("..")
        try:
            lower, upper = int(lower_s), int(upper_s)
        except ValueError:
            raise ValueError(f"port range {text!r} is not LOWER..UPPER") from None
        if not sep or not (0 <= lower <= upper <= 65535):
            raise ValueError(f"port range {text!r} is not LOWER..UPPER within 0..65535")
        if upper - lower != 0 and upper - lower < min_size:
            raise ValueError(
                f"port range {text!r} spans fewer than {min_size} ports (EG_MIN_PORT_RANGE_SIZE)"
            )
        return cls(lower, upper)

    def candidate(self) -> int:
        """A port to try: 0 (the OS picks) for ``0..0``, else a random one in the range."""
        return 0 if self.upper == 0 else random.randint(self.lower, self.upper)


def bind_in_range(ip: str, ports: PortRange, retries: int) -> socket.socket:
    """A TCP socket bound to ``ip`` on a port in ``ports`` (random tries, as EG's launchers)."""
    last: OSError | None = None
    for _ in range(max(1, retries + 1)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((ip, ports.candidate()))
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise RuntimeError(
        f"no free port in {ports.lower}..{ports.upper} after {retries} retries: {last}"
    )


def write_connection_file(ip: str, ports: Mapping[str, int], directory: Path) -> Path:
    """The kernel's connection file (mode 0600) with a fresh HMAC key."""
    info = {
        **ports,
        "ip": ip,
        "key": uuid.uuid4().hex,
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "kernel_name": "kernelvisor",
    }
    fd, name = tempfile.mkstemp(prefix="kernel-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return Path(name)


def encrypt_payload(connection_info: Mapping[str, object], public_key: str) -> bytes:
    """EG's version-1 response: base64 of JSON ``{version, key, conn_info}``, where
    ``conn_info`` is the AES-ECB (PKCS#7) ciphertext of the JSON connection info and ``key``
    the AES key encrypted with EG's RSA public key (base64 DER, PKCS#1 v1.5). ECB is EG's
    choice, not ours; it carries one message under a key used once."""
    from cryptography.hazmat.primitives import padding, serialization
    from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    aes_key = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(connection_info).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
    cipher_text = encryptor.update(plain) + encryptor.finalize()
    rsa_key = serialization.load_der_public_key(base64.b64decode(public_key))
    if not isinstance(rsa_key, RSAPublicKey):
        raise ValueError("the public key is not an RSA key")
    wrapped_key = rsa_key.encrypt(aes_key, rsa_padding.PKCS1v15())
    payload = {
        "version": PAYLOAD_VERSION,
        "key": base64.b64encode(wrapped_key).decode(),
        "conn_info": base64.b64encode(cipher_text).decode(),
    }
    return base64.b64encode(json.dumps(payload).encode())


def send_response(address: str, payload: bytes, timeout: float = 30.0) -> None:
    """Sends ``payload`` to EG's response address ``host:port`` and closes (EG reads to EOF)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"response address {address!r} is not HOST:PORT")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
        s.sendall(payload)


class CommServer:
    """Serves EG's communication port for the supervisor process ``kernel``."""

    def __init__(self, sock: socket.socket, kernel: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.kernel = kernel
        self.shutdown = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="eg-comm", daemon=True)

    def start(self) -> None:
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _serve(self) -> None:
        while not self.shutdown.is_set() and self.kernel.poll() is None:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self.handle(read_request(conn))
                except (OSError, ValueError) as e:
                    log.warning("bad request on the communication port: %s", e)

    def handle(self, request: Mapping[str, object]) -> None:
        """Carries out one request."""
        if "signum" in request:
            signum = int(request["signum"])  # type: ignore[call-overload]
            if signum != 0:  # 0 is EG's liveness poll: answering the connection was the answer
                log.info("signal %d for the kernel (communication port)", signum)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.kernel.pid, signum)
        if request.get("shutdown"):
            log.info("shutdown requested (communication port)")
            self.shutdown.set()


def read_request(conn: socket.socket) -> Mapping[str, object]:
    """One JSON request: everything until the peer closes (at most MAX_REQUEST bytes)."""
    conn.settimeout(10)
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    request = json.loads(data or b"null")
    if not isinstance(request, dict):
        raise ValueError(f"not a JSON object: {data[:100]!r}")
    return request


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> argparse.Namespace:
    """EG's launcher arguments (``--RemoteProcessProxy.X`` or ``--X``; environment fallbacks),
    plus ``--ip`` and, after ``--``, arguments for the kernelvisor binary."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m kernelvisor.eg_launcher", description=__doc__)
    for name, var in (
        ("kernel-id", "KERNEL_ID"),
        ("response-address", "RESPONSE_ADDRESS"),
        ("public-key", "PUBLIC_KEY"),
        ("port-range", "PORT_RANGE"),
        ("spark-context-initialization-mode", "KERNEL_SPARK_CONTEXT_INIT_MODE"),
        ("cluster-type", "KERNEL_CLUSTER_TYPE"),
    ):
        dest = name.replace("-", "_")
        default = env.get(var) or env.get(f"EG_{var}")
        parser.add_argument(f"--{name}", f"--RemoteProcessProxy.{name}", dest=dest, default=default)
    parser.add_argument(
        "--ip", default=env.get("KERNELVISOR_EG_IP", "0.0.0.0"), help="address to bind"
    )
    parser.add_argument("--kernel-class-name", help="ignored (an ipykernel option)")
    args = parser.parse_args(argv)
    args.kernelvisor_args = extra
    for required in ("kernel_id", "response_address", "public_key"):
        if not getattr(args, required):
            parser.error(
                f"--{required.replace('_', '-')} is required (or its environment variable)"
            )
    if (args.spark_context_initialization_mode or "none") != "none":
        parser.error("kernelvisor has no Spark context: --spark-context-initialization-mode none")
    return args


def launch(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Runs the contract; returns the exit code (the supervisor's)."""
    ports = PortRange.parse(args.port_range, int(env.get("EG_MIN_PORT_RANGE_SIZE", "1000")))
    retries = int(env.get("EG_MAX_PORT_RANGE_RETRIES", "5"))
    if ports.upper:
        retries = max(retries, 50)  # random tries in a busy range: a few more than EG's 5
    reserved = {name: bind_in_range(args.ip, ports, retries) for name in CHANNELS}
    comm_sock = bind_in_range(args.ip, ports, retries)
    workdir = Path(tempfile.mkdtemp(prefix="kernelvisor-eg-"))
    conn_file = write_connection_file(
        args.ip, {n: s.getsockname()[1] for n, s in reserved.items()}, workdir
    )
    for sock in reserved.values():  # free them for the supervisor to bind
        sock.close()

    binary = find_binary()
    cmd = [str(binary), "-f", str(conn_file), "--python", sys.executable, *args.kernelvisor_args]
    log.info("starting %s", " ".join(cmd))
    kernel = subprocess.Popen(cmd)
    # After the start, so that the supervisor does not inherit SIG_IGN. An interrupt sent to the
    # process group reaches the supervisor by itself; forwarding it too would make it a second
    # interrupt, which kills the cell's worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (EG's kill, a pod's stop): end the supervisor at once, then exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    comm = CommServer(comm_sock, kernel)
    comm.start()
    try:
        info = json.loads(conn_file.read_text())
        info |= {
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "comm_port": comm_sock.getsockname()[1],
            "kernel_id": args.kernel_id,
        }
        send_response(args.response_address, encrypt_payload(info, args.public_key))
        log.info(
            "connection info sent to %s (comm port %d)", args.response_address, info["comm_port"]
        )
        while kernel.poll() is None and not comm.shutdown.wait(0.2):
            pass
        if kernel.poll() is None:
            stop(kernel, wait_first=True)
        return kernel.returncode or 0
    except BaseException:
        stop(kernel, wait_first=False)
        raise
    finally:
        comm.close()
        with contextlib.suppress(OSError):
            conn_file.unlink()
            workdir.rmdir()


def stop(kernel: subprocess.Popen[bytes], wait_first: bool) -> None:
    """Ends the supervisor: SIGTERM, then SIGKILL, each after a grace period; with
    ``wait_first``, it first gets one to exit by itself (EG sends it a shutdown_request)."""
    actions = (
        (None, kernel.terminate, kernel.kill) if wait_first else (kernel.terminate, kernel.kill)
    )
    for action in actions:
        if action is not None:
            with contextlib.suppress(ProcessLookupError):
                action()
        try:
            kernel.wait(SHUTDOWN_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("KERNELVISOR_EG_LOG", "INFO").upper(),
        format="[%(levelname).1s %(asctime)s kernelvisor.eg_launcher] %(message)s",
    )
    args = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    return launch(args, os.environ)


if __name__ == "__main__":
    sys.exit(main())
