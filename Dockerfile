# A kernel image for Enterprise Gateway's Kubernetes (and Docker) process proxies: kernelvisor
# with its Enterprise Gateway launcher as the entry point. EG's launch_kubernetes.py starts a pod
# from this image with KERNEL_ID, RESPONSE_ADDRESS, PUBLIC_KEY and PORT_RANGE in its environment;
# the launcher picks the ports, sends the connection info back to EG and runs the kernel.
#
#   docker build -t kernelvisor-kernel:0.1.0 .
#
# Not built in this repository's CI (no container runtime there); see
# kernelspec/enterprise-gateway/README.md for what is and is not tested.

# Build: the wheel (the Rust supervisor + the worker package), as `pip wheel .` builds it.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir 'maturin>=1.5,<2' \
    && /opt/build/bin/maturin build --release --locked --out /wheels

# Run: Python with kernelvisor, its EG extra, and the libraries notebooks commonly expect.
FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/kernelvisor-*.whl)[eg,trio]" matplotlib ipywidgets \
    && rm -rf /wheels \
    && useradd --create-home --uid 1000 --gid 100 jovyan
USER 1000
WORKDIR /home/jovyan
# SIGINT from EG reaches the launcher only through its communication port; PID 1 has no default
# signal actions, so the launcher installs its own (SIGTERM ends the kernel).
CMD ["python", "-m", "kernelvisor.eg_launcher"]
