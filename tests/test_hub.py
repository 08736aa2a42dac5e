"""flaxnets.hub: published weights fetched by name, checked, cached, converted; all offline.

Files are served from 127.0.0.1 by `http.server` in a thread of the test: the transport is the real one
(pooch over requests) without the internet. Tests that load a weight set by name put a file of their own in
the table (its URL and hash prefix), since the published files themselves cannot be fetched here; the code
path after the table is the one every published set takes. The table itself is checked against the
installed torchvision's ``*_Weights`` enums when torchvision imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import json
import os
import re
import socket
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
import weights_table
from reference import torchvision_or_skip

import flaxnets
from flaxnets import convert, hub
from flaxnets.pth import WeightsFileError


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; with ``server.truncate``, announces each whole file but sends half and hangs up."""

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def copyfile(self, source, outputfile):
        if self.server.truncate:
            outputfile.write(source.read(os.fstat(source.fileno()).st_size // 2))
            self.close_connection = True
            return
        super().copyfile(source, outputfile)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(folder: Path, truncate: bool = False):
    """``(base URL, server)`` of an HTTP server for ``folder`` on 127.0.0.1, for the ``with`` block only."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    server.truncate, server.requests = truncate, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: what an unreachable network looks like, at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder of the test's own, and no mirror."""
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    return tmp_path / "cache"


def hashed(folder: Path, stem: str, payload: bytes, suffix: str = ".pth") -> Path:
    """``payload`` written as torch.hub names files: ``STEM-<first 8 hex digits of its SHA-256>.pth``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{hashlib.sha256(payload).hexdigest()[:8]}{suffix}"
    path.write_bytes(payload)
    return path


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_a_download_is_checked_cached_and_then_used_without_the_network(cache, tmp_path):
    payload = np.random.default_rng(0).bytes(3 << 20)  # several of the downloader's 1 MiB chunks
    served = hashed(tmp_path / "server", "weights", payload)
    with serving(served.parent) as (base, server):
        url = f"{base}/{served.name}"
        assert hub.fetch_url(url) == cache / served.name
    assert server.requests == [f"/{served.name}"] and (cache / served.name).read_bytes() == payload
    assert files(cache) == [served.name]  # no temporary file left beside it
    assert hub.fetch_url(url) == cache / served.name  # the server is gone: the cache answers


def test_a_file_whose_hash_does_not_match_is_refused_and_not_cached(cache, tmp_path):
    served = tmp_path / "server" / "weights-00000000.pth"  # a name promising a hash the bytes do not have
    served.parent.mkdir()
    served.write_bytes(b"not the published bytes")
    with serving(served.parent) as (base, _):
        with pytest.raises(WeightsFileError, match=rf"^the file downloaded from {re.escape(base)}/weights-00000000"
                                                   r"\.pth is not the published file: its SHA-256 begins [0-9a-f]{8}, "
                                                   r"its name promises 00000000\.$"):
            hub.fetch_url(f"{base}/{served.name}")
        # A hash given by the caller is checked the same way, for a name that carries none.
        (served.parent / "plain.bin").write_bytes(b"x")
        with pytest.raises(WeightsFileError, match="is not the published file"):
            hub.fetch_url(f"{base}/plain.bin", sha256="abcdef12")
    assert files(cache) == []


def test_an_interrupted_transfer_leaves_no_partial_file(cache, tmp_path):
    served = hashed(tmp_path / "server", "weights", np.random.default_rng(1).bytes(1 << 20))
    with serving(served.parent, truncate=True) as (base, _):
        url = f"{base}/{served.name}"
        with pytest.raises(hub.WeightsDownloadError) as error:
            hub.fetch_url(url)
    assert str(error.value) == (f"cannot download {url} (the transfer broke off); download it yourself and put it "
                                f"at {cache / served.name}, where flaxnets will pick it up.")
    assert files(cache) == []


def test_offline_the_error_names_the_url_and_the_cache_path_where_a_copy_is_picked_up(cache, tmp_path, monkeypatch):
    # By name: torchvision's real entry for resnet18, with the mirror variable pointing where nothing listens.
    base = closed_port_url()
    monkeypatch.setenv(hub.MIRROR_ENV, base)
    weights = hub.get_weights("resnet18", "IMAGENET1K_V1")
    target = cache / weights.file_name
    with pytest.raises(hub.WeightsDownloadError) as error:
        flaxnets.load_pretrained("resnet18", "IMAGENET1K_V1")
    assert str(error.value) == (f"cannot download {base}/{weights.file_name} (the network or the server is "
                                f"unreachable); download it yourself and put it at {target}, where flaxnets will "
                                "pick it up.")
    assert files(cache) == []
    # A copy put there by hand is used, still offline (its bytes are checked against the name's hash).
    payload = b"a file downloaded some other way"
    copy = hashed(tmp_path / "elsewhere", "manual", payload)
    monkeypatch.delenv(hub.MIRROR_ENV)
    target = cache / copy.name
    target.write_bytes(payload)
    assert hub.fetch_url(f"{closed_port_url()}/{copy.name}") == target
    target.write_bytes(payload + b"!")  # a cached file that changed is refused, not silently used
    with pytest.raises(WeightsFileError, match=rf"^{re.escape(str(target))} \(in the cache; delete it to download it "
                                               r"again\) is not the published file"):
        hub.fetch_url(f"{closed_port_url()}/{copy.name}")


def publish(monkeypatch, arch: str, name: str, path: Path, **changes) -> hub.Weights:
    """Put ``path`` in the weights table as ``arch``'s weight set ``name``, at torchvision's address."""
    prefix = hub.sha256_prefix(path.name)
    weights = dataclasses.replace(hub.get_weights(arch, name), url=f"https://download.pytorch.org/models/{path.name}",
                                  sha256_prefix=prefix, **changes)
    monkeypatch.setitem(hub.WEIGHTS, arch, {**hub.WEIGHTS[arch], name: weights})
    return weights


def test_the_mirror_variable_replaces_the_base_url_or_names_a_folder(cache, tmp_path, monkeypatch):
    served = hashed(tmp_path / "server" / "mirror", "resnet18", b"weights from a mirror")
    weights = publish(monkeypatch, "resnet18", "IMAGENET1K_V1", served)
    with serving(tmp_path / "server") as (base, server):
        monkeypatch.setenv(hub.MIRROR_ENV, f"{base}/mirror/")
        assert hub.fetch(weights) == cache / served.name
    assert server.requests == [f"/mirror/{served.name}"]
    # A folder, or a file:// URL: the files are used where they are, not copied into the cache.
    (cache / served.name).unlink()
    for mirror in (str(served.parent), served.parent.as_uri()):
        monkeypatch.setenv(hub.MIRROR_ENV, mirror)
        assert hub.resolve("resnet18", "IMAGENET1K_V1") == served
    assert hub.resolve("resnet18", served.as_uri()) == served  # a file:// URL given directly
    assert files(cache) == []
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / "empty"))
    with pytest.raises(WeightsFileError, match=r"names no file\.$"):
        hub.fetch(weights)


def randomised_bn(torch, model, seed: int = 0):
    """``model`` with random BatchNorm affine parameters and running statistics (torchvision starts them
    at 1, 0, 0, 1: the values a conversion that dropped them would give too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.2, 0.2),
                                          (module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 1.5)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.eval()


def test_published_weights_by_name_load_without_torch_and_give_torchvision_logits(cache, tmp_path, monkeypatch):
    """The whole path of a 2017 file: torch.save's legacy format, served, downloaded, checked, read with
    `import torch` blocked, converted; logits equal torchvision's within 1e-4 of their scale."""
    torch, torchvision = torchvision_or_skip()
    torch.manual_seed(0)
    reference = randomised_bn(torch, torchvision.models.resnet18())
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    legacy = tmp_path / "legacy.pth"
    torch.save(reference.state_dict(), legacy, _use_new_zipfile_serialization=False)
    served = hashed(tmp_path / "server", "resnet18", legacy.read_bytes())
    publish(monkeypatch, "resnet18", "IMAGENET1K_V1", served)

    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    with serving(served.parent) as (base, _):
        monkeypatch.setenv(hub.MIRROR_ENV, base)
        variables = flaxnets.load_pretrained("resnet18", "IMAGENET1K_V1")
    model = flaxnets.create_model("resnet18", num_classes=1000)
    logits = np.asarray(jax.jit(model.apply, static_argnames="train")(variables, images.numpy().transpose(0, 2, 3, 1),
                                                                       train=False))
    assert np.abs(logits - expected).max() / np.abs(expected).max() <= 1e-4


def test_densenet_files_with_the_old_key_names_convert_as_torchvision_loads_them():
    """torchvision's DenseNet files say ``norm.1`` where its modules say ``norm1`` (torchvision renames on load)."""
    rng = np.random.default_rng(0)
    current = {key: rng.standard_normal(shape).astype(np.float32)
               for key, shape in convert.torch_shapes("densenet121").items()}
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
           for key, value in current.items()}
    # 58 dense layers, each with norm1 (4 tensors), conv1, norm2 (4) and conv2 under old names.
    assert "features.denseblock1.denselayer1.norm.1.weight" in old and len(set(old) - set(current)) == 58 * 10
    assert jax.tree.all(jax.tree.map(np.array_equal, convert.from_torch("densenet121", old),
                                     convert.from_torch("densenet121", current)))


def test_every_torchvision_architecture_has_its_weights_in_the_table():
    """Offline facts of the table: every architecture flaxnets converts has IMAGENET1K_V1; each file's name
    carries the hash prefix recorded; parameter counts, top-1 and input side agree with the registry."""
    assert sorted(hub.WEIGHTS) == sorted(convert.supported_models())
    for arch, sets in hub.WEIGHTS.items():
        spec = flaxnets.get_spec(arch)
        assert "IMAGENET1K_V1" in sets and set(sets) <= {"IMAGENET1K_V1", "IMAGENET1K_V2"}, arch
        assert hub.get_weights(arch, "DEFAULT") == sets[hub.DEFAULT_WEIGHTS[arch]]
        assert sets["IMAGENET1K_V1"].acc1 == spec.top1
        for weights in sets.values():
            assert weights.url == f"https://download.pytorch.org/models/{weights.file_name}"
            assert hub.sha256_prefix(weights.file_name) == weights.sha256_prefix
            assert (weights.num_params, weights.crop, weights.interpolation) == (spec.params, spec.input_size,
                                                                                 "bilinear"), arch
    classes = hub.imagenet_classes()
    assert len(classes) == 1000 and classes[:2] == ("tench", "goldfish")


def test_the_table_is_torchvisions_own_record():
    """The shipped table and class names equal what the installed torchvision's Weights enums say."""
    torchvision_or_skip()
    table, classes = weights_table.build()
    shipped = json.loads((Path(hub.__file__).parent / "data" / "torchvision_weights.json").read_text())
    assert {k: v for k, v in shipped.items() if k != "source"} == {k: v for k, v in table.items() if k != "source"}
    assert list(hub.imagenet_classes()) == classes


def test_names_and_unknown_weights_are_one_sentence():
    assert hub.find_weights("resnet50", "DEFAULT").name == "IMAGENET1K_V2"
    assert hub.find_weights("resnet50", "https://mirror.example/models/resnet50-0676ba61.pth").name == "IMAGENET1K_V1"
    assert hub.find_weights("resnet50", "my-own-weights.pth") is None
    with pytest.raises(WeightsFileError, match=r"^resnet18 has no weights named IMAGENET1K_V2; it has IMAGENET1K_V1 "
                                               r"\(and DEFAULT, the best of them\)\.$"):
        flaxnets.load_pretrained("resnet18", "IMAGENET1K_V2")
    with pytest.raises(WeightsFileError, match=r"^resnet18_cifar has no published weights; the architectures that "
                                               r"have are alexnet, densenet121, .*\.$"):
        hub.resolve("resnet18_cifar", "IMAGENET1K_V1")


def test_a_file_named_as_published_counts_only_when_its_bytes_are(tmp_path):
    """A download kept elsewhere gets its weights' preprocessing; a file merely named so does not."""
    weights = hub.get_weights("resnet18", "IMAGENET1K_V1")
    impostor = tmp_path / weights.file_name
    impostor.write_bytes(b"something else")
    assert hub.find_weights("resnet18", impostor) is None
