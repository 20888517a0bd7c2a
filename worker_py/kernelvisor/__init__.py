"""kernelvisor's Python worker: runs cells for the Rust supervisor over a Unix socket.

Importing the package must stay cheap: the supervisor imports nothing, but tools and
tests do, and IPython is only loaded by ``kernelvisor.worker`` when a worker starts.
"""

__version__ = "0.1.0"
