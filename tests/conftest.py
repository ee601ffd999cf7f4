"""Shared fixtures: a small demo source folder and the store built from it,
made once per test session (a few seconds); a local S3 server for the
object-storage tests, started on first use and stopped at the session's end."""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch

from engine.store import PixelLayout
from preprocess.build_zarr import build_store
from preprocess.demo_data import write_demo

DEMO_COUNT = 32
DEMO_SUPPLEMENTAL = 4
DEMO_SEED = 7
DEMO_SIDES = (64, 700)


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory):
    """A Kaggle-layout folder: 32 training and 4 supplemental images, 64-700 px."""
    folder = tmp_path_factory.mktemp("demo") / "source"
    write_demo(folder, count=DEMO_COUNT, seed=DEMO_SEED, min_side=DEMO_SIDES[0],
               max_side=DEMO_SIDES[1], supplemental=DEMO_SUPPLEMENTAL, progress=False)
    return folder


@pytest.fixture(scope="session")
def demo_store(demo_source, tmp_path_factory):
    """Path of the complete store built from demo_source (read it, don't modify it)."""
    out = tmp_path_factory.mktemp("store") / "store.zarr"
    build_store(demo_source, out, workers=2, progress=False, figure=False)
    return out


# small tiles in shards of 16: a few images a block, so blocks_store has
# several blocks of every tiles array (engine/packing.py)
BLOCKS_LAYOUT = PixelLayout(chunk=64, codec="lz4", level=9, shard_tiles=16)


@pytest.fixture(scope="session")
def blocks_store(tmp_path_factory):
    """Path of a store of 16 small images (64-250 px: at most 16 tiles of
    BLOCKS_LAYOUT a level) packed in several blocks (read it, don't modify it)."""
    source = tmp_path_factory.mktemp("blocks") / "source"
    write_demo(source, count=16, seed=DEMO_SEED, min_side=64, max_side=250, supplemental=0,
               progress=False)
    out = tmp_path_factory.mktemp("blocks") / "store.zarr"
    build_store(source, out, workers=1, progress=False, figure=False, pixel_layout=BLOCKS_LAYOUT)
    return out


@pytest.fixture(scope="module")
def store(demo_store, tmp_path_factory):
    """A private copy of the demo store for one test module: mining writes into it."""
    copy = tmp_path_factory.mktemp("store") / "store.zarr"
    shutil.copytree(demo_store, copy)
    return copy


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny tensors: one torch thread beats two spinning OpenMP
    threads on a 2-core machine shared with DALI's threads and workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port) that checks credentials,
    and the environment a client needs: {"endpoint", "key", "secret"}.
    Sets AWS_* for the session (workers and subprocesses inherit them)."""
    from moto import settings
    from moto.server import ThreadedMotoServer
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    saved = {k: os.environ.get(k) for k in env}
    unchecked = settings.INITIAL_NO_AUTH_ACTION_COUNT
    os.environ.update(env)
    try:
        import boto3
        import s3fs
        # fsspec keeps one S3FileSystem per set of arguments: one made by an
        # earlier test without credentials (a store's error message names its
        # rebuild command, which opens the store) would be handed to these
        s3fs.S3FileSystem.clear_instance_cache()
        # the server checks signatures once its first requests (these) are
        # done: a user with every permission, whose key the tests use
        iam = boto3.session.Session().client("iam")
        iam.create_user(UserName="tests")
        key = iam.create_access_key(UserName="tests")["AccessKey"]
        iam.put_user_policy(UserName="tests", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                          AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        yield {"endpoint": env["AWS_ENDPOINT_URL"], "key": key["AccessKeyId"],
               "secret": key["SecretAccessKey"]}
    finally:
        server.stop()
        settings.INITIAL_NO_AUTH_ACTION_COUNT = unchecked
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
