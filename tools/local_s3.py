"""A local S3 endpoint for the tools (bench_read.py, faults.py): moto's standalone server (``python -m
moto.server``, the pip package moto[server] of the dev extra) in a subprocess on a free port of 127.0.0.1, with one
bucket. Inside the ``with``, this process and the processes it starts reach it as a user reaches any S3 endpoint:
dummy credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint in AWS_ENDPOINT_URL_S3
(teachercache/format/storage.py); nothing of s3fs is patched.

    with LocalS3("bench") as s3:
        url = s3.url("cache")        # s3://bench/cache
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


class LocalS3:
    def __init__(self, bucket: str = "tools"):
        self.bucket = bucket
        self.proc = None
        self.saved: dict = {}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def __enter__(self) -> "LocalS3":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise SystemExit("moto's S3 server did not start: pip install 'moto[server]>=5'")
                time.sleep(0.1)
        self.endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_S3": self.endpoint, "FSSPEC_S3_ENDPOINT_URL": self.endpoint}
        self.saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.env = env
        import fsspec

        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = self.endpoint  # fsspec read FSSPEC_* on import
        self.fs = fsspec.filesystem("s3", skip_instance_cache=True)
        self.fs.mkdir(self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for k, v in self.saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
