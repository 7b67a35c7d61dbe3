"""Entry point of a decoder child process: ``python -m captionflow.video.decoder_process FD
LIMIT [DEVICE]`` (started by :class:`captionflow.video.pool.DecodePool`, never by hand).

A module of its own, not imported by the package, so ``-m`` runs it exactly once.
"""

import sys
from multiprocessing.connection import Connection

from captionflow.video.pool import child_main

if __name__ == "__main__":
    child_main(Connection(int(sys.argv[1])), int(sys.argv[2]), *sys.argv[3:4])
