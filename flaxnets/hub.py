"""Published weights by name: torchvision's ImageNet weights, downloaded once into a cache and verified.

The table (``flaxnets/data/torchvision_weights.json``) records, for every architecture torchvision
publishes ImageNet weights for, each weight set (``IMAGENET1K_V1``, and ``IMAGENET1K_V2`` where it exists):
the file's URL, the SHA-256 prefix its name carries, torchvision's reported accuracy and the preprocessing
that accuracy was measured with. It is generated from torchvision's own ``*_Weights`` enums by
``python tests/weights_table.py``, and tests/test_hub.py checks it against them whenever torchvision imports;
here it is read without torchvision. ``imagenet_classes.txt`` beside it holds the 1,000 class names in the
order of the weights' outputs.

`fetch` gives the local file of a weight set:

* the cache folder is ``~/.cache/flaxnets`` (``FLAXNETS_CACHE_DIR`` moves it); a file there is used
  without the network, after its hash is checked (one SHA-256 pass, about a second per gigabyte);
* a missing file is downloaded with pooch's HTTP downloader (progress bar on stderr) from torchvision's
  server, or from ``FLAXNETS_WEIGHTS_URL`` in its place: the base URL of a mirror holding the same file
  names, or a ``file://`` URL or folder holding them, whose files are then used where they are;
* the download goes to a hidden temporary name beside its final place, is checked, and only then renamed
  into place: a broken transfer, Ctrl-C, or a file of the wrong hash leaves nothing in the cache.

torchvision's file names carry only the first 8 to 10 hex digits of the file's SHA-256 (torch.hub's
``NAME-<prefix>.pth`` convention), so that prefix is what is checked; pooch's own check wants the whole
hash, which is published nowhere for these files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from flaxnets.pth import WeightsFileError

__all__ = [
    "CACHE_ENV",
    "MIRROR_ENV",
    "Weights",
    "WeightsDownloadError",
    "cache_dir",
    "fetch",
    "fetch_url",
    "find_weights",
    "get_weights",
    "imagenet_classes",
    "is_url",
    "is_weights_name",
    "list_weights",
    "resolve",
    "sha256_prefix",
]

CACHE_ENV = "FLAXNETS_CACHE_DIR"
MIRROR_ENV = "FLAXNETS_WEIGHTS_URL"
_DATA = Path(__file__).resolve().parent / "data"
# torch.hub's file names: NAME-<hex>.EXT, the hex a prefix of the file's SHA-256.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.[^.]+$")
_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
# Large reads: a weights file is hundreds of megabytes, and per-call overhead dominates at pooch's 1 KiB.
_CHUNK = 1 << 20


class WeightsDownloadError(WeightsFileError):
    """A weights file that cannot be downloaded; the message names the URL and where to put the file instead."""


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published weight set of one architecture, and how its accuracy was measured.

    Attributes:
      arch, name: e.g. ``"resnet50"``, ``"IMAGENET1K_V2"``.
      url: the file as torchvision publishes it.
      sha256_prefix: the start of the file's SHA-256, from its name.
      acc1, acc5: torchvision's ImageNet-1K validation top-1 and top-5 (%), with this preprocessing.
      num_params: parameters of the model the file fits.
      resize: the shorter side images are resized to before the centre crop.
      crop: the side of the centre crop: the model's input.
      interpolation: of the resize (``"bilinear"`` for every set in the table).
      mean, std: per RGB channel, of pixels scaled to [0, 1].
    """

    arch: str
    name: str
    url: str
    sha256_prefix: str
    acc1: float
    acc5: float
    num_params: int
    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def file_name(self) -> str:
        """The file's name, which is also its name in the cache (``resnet50-11ad3fa6.pth``)."""
        return self.url.rsplit("/", 1)[1]

    @property
    def num_classes(self) -> int:
        """Classes of the weights' output: ImageNet-1K's 1,000 for every set in the table."""
        return len(imagenet_classes())

    def preprocess(self, images):
        """One image or a list (Pillow images or uint8 arrays, grey or colour, of any sizes) as the float32
        NHWC batch these weights were scored on: shorter side ``resize``, centre ``crop``, ``mean``/``std``
        (`flaxnets.images.prepare`; torchvision's ``weights.transforms()``)."""
        from flaxnets.images import prepare

        if self.interpolation != "bilinear":
            raise ValueError(f"{self.arch} {self.name} was scored with {self.interpolation} resizing; "
                             "flaxnets.images resizes bilinearly.")
        return prepare(images, resize=self.resize, crop=self.crop, mean=self.mean, std=self.std)


def _read_table() -> tuple[dict[str, dict[str, Weights]], dict[str, str]]:
    table = json.loads((_DATA / "torchvision_weights.json").read_text())
    weights = {
        arch: {name: Weights(arch, name, entry["url"], entry["sha256_prefix"], entry["acc@1"], entry["acc@5"],
                             entry["num_params"], entry["resize"], entry["crop"], entry["interpolation"],
                             tuple(entry["mean"]), tuple(entry["std"]))
               for name, entry in sets.items()}
        for arch, sets in table["weights"].items()
    }
    return weights, dict(table["default"])


# arch -> weights name -> Weights; arch -> the name torchvision's ``DEFAULT`` stands for.
WEIGHTS, DEFAULT_WEIGHTS = _read_table()


def list_weights(arch: str | None = None) -> list[str]:
    """The weight sets of ``arch`` (``["IMAGENET1K_V1", "IMAGENET1K_V2"]``), or of every architecture as
    ``"arch.NAME"``; an architecture without published weights has none."""
    if arch is None:
        return [f"{a}.{name}" for a in sorted(WEIGHTS) for name in WEIGHTS[a]]
    return list(WEIGHTS.get(arch, {}))


def get_weights(arch: str, name: str) -> Weights:
    """The weight set ``name`` of ``arch``; ``"DEFAULT"`` is torchvision's best (V2 where there is one).

    Raises:
      WeightsFileError: ``arch`` has no published weights, or none of that name (the known ones are listed).
    """
    if arch not in WEIGHTS:
        raise WeightsFileError(f"{arch} has no published weights; the architectures that have are "
                               f"{', '.join(sorted(WEIGHTS))}.")
    name = DEFAULT_WEIGHTS[arch] if name == "DEFAULT" else name
    if name not in WEIGHTS[arch]:
        raise WeightsFileError(f"{arch} has no weights named {name}; it has {', '.join(WEIGHTS[arch])} "
                               "(and DEFAULT, the best of them).")
    return WEIGHTS[arch][name]


def find_weights(arch: str, source: str | os.PathLike) -> Weights | None:
    """The published weight set ``source`` stands for, whose preprocessing and model fields then apply to it:
    a name (`get_weights`); a URL whose file name is that of one of ``arch``'s published files (a mirror's
    copy, checked against the hash in its name when it is fetched); a file of that name whose SHA-256 begins
    as its name says (a download kept elsewhere). None for anything else."""
    text = os.fspath(source)
    if is_weights_name(text) and not os.path.exists(text):
        return get_weights(arch, text)
    name = urllib.parse.urlparse(text).path.rsplit("/", 1)[-1] if is_url(text) else Path(text).name
    found = next((w for w in WEIGHTS.get(arch, {}).values() if w.file_name == name), None)
    if found is None or is_url(text):
        return found
    path = Path(text)
    return found if path.is_file() and _cached_sha256(path.resolve(), path.stat().st_mtime_ns).startswith(
        found.sha256_prefix) else None


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet-1K class names in the order of the weights' outputs (torchvision's list)."""
    return tuple((_DATA / "imagenet_classes.txt").read_text().splitlines())


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$FLAXNETS_CACHE_DIR``, else ``~/.cache/flaxnets``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flaxnets").expanduser()


def is_url(text: str | os.PathLike) -> bool:
    """Whether ``text`` is an ``http://``, ``https://`` or ``file://`` URL (rather than a path or a name)."""
    return urllib.parse.urlparse(os.fspath(text)).scheme in ("http", "https", "file")


def is_weights_name(text: str | os.PathLike) -> bool:
    """Whether ``text`` reads as a weight set's name (``IMAGENET1K_V1``, ``DEFAULT``) rather than a path."""
    return bool(_NAME.fullmatch(os.fspath(text)))


def sha256_prefix(file_name: str) -> str | None:
    """The SHA-256 prefix a torch.hub-style file name carries (``resnet50-11ad3fa6.pth`` -> ``11ad3fa6``)."""
    found = _HASH_IN_NAME.search(file_name)
    return found.group(1) if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(16 * _CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: Path, mtime_ns: int) -> str:
    """`_sha256` once per file version: a run asks about its weights file more than once."""
    return _sha256(path)


def _check_hash(path: Path, prefix: str | None, source: str) -> None:
    if prefix is None:
        return
    actual = _sha256(path)
    if not actual.startswith(prefix.lower()):
        raise WeightsFileError(f"{source} is not the published file: its SHA-256 begins {actual[:len(prefix)]}, "
                               f"its name promises {prefix}.")


def _local_path(url: str) -> Path | None:
    """The file a ``file://`` URL names; None for a remote URL."""
    parsed = urllib.parse.urlparse(url)
    return Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else None


def _reason(error: Exception) -> str:
    """A few words for why a download failed (requests' own messages run to several lines)."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"the server answered HTTP {error.response.status_code}"
    if isinstance(error, requests.Timeout):
        return "the server did not answer in time"
    if isinstance(error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "the transfer broke off"
    if isinstance(error, requests.ConnectionError):
        return "the network or the server is unreachable"
    if isinstance(error, OSError) and not isinstance(error, requests.RequestException):
        return error.strerror or type(error).__name__
    return "the transfer broke off"


def _download(url: str, target: Path, prefix: str | None) -> Path:
    """``url`` into ``target``, atomically, after checking ``prefix``; nothing is left behind on failure."""
    import pooch
    import requests

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsDownloadError(f"cannot make the cache folder {target.parent} ({error.strerror}); set "
                                   f"{CACHE_ENV} to a folder you can write to.") from None
    # A name of its own per attempt, so that two processes downloading the same file do not write into
    # one another's; the rename into place is atomic, so a reader sees the whole file or none.
    partial = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    print(f"downloading {url} to {target}", file=sys.stderr, flush=True)
    try:
        pooch.HTTPDownloader(progressbar=True, chunk_size=_CHUNK)(url, str(partial), None)
        _check_hash(partial, prefix, f"the file downloaded from {url}")
        os.replace(partial, target)
    except (requests.RequestException, OSError) as error:
        raise WeightsDownloadError(f"cannot download {url} ({_reason(error)}); download it yourself and put it at "
                                   f"{target}, where flaxnets will pick it up.") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def fetch_url(url: str, sha256: str | None = None) -> Path:
    """The local file of ``url``: the cached copy, or a fresh download into the cache.

    A ``file://`` URL is used where it is. The file is checked against ``sha256`` (a prefix of the hash is
    enough) or else against the prefix its name carries, if it carries one (``NAME-<hex>.pth``). Files are
    cached by name, so two URLs ending in the same file name share one cache entry, as in torch.hub.

    Raises:
      WeightsDownloadError: the file is not cached and cannot be downloaded (the sentence names the URL and
        the cache path where a file downloaded by hand is picked up).
      WeightsFileError: the file does not match its hash.
    """
    name = urllib.parse.urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
    prefix = sha256 or sha256_prefix(name)
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise WeightsFileError(f"{url} names no file.")
        _check_hash(local, prefix, str(local))
        return local
    if not name:
        raise WeightsFileError(f"{url} names no file to download.")
    target = cache_dir() / name
    if target.is_file():
        _check_hash(target, prefix, f"{target} (in the cache; delete it to download it again)")
        return target
    return _download(url, target, prefix)


def fetch(weights: Weights) -> Path:
    """The local file of a published weight set, from the cache or downloaded into it (see the module)."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return fetch_url(weights.url, weights.sha256_prefix)
    if not is_url(mirror):  # a folder holding the files
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return fetch_url(f"{mirror.rstrip('/')}/{weights.file_name}", weights.sha256_prefix)


def resolve(arch: str, source: str | os.PathLike) -> Path:
    """The local file of ``source``: a weight set's name for ``arch`` (`get_weights`, `fetch`), a URL
    (`fetch_url`) or a path (returned as it is)."""
    text = os.fspath(source)
    if is_url(text):
        return fetch_url(text)
    if is_weights_name(text) and not os.path.exists(text):
        return fetch(get_weights(arch, text))
    return Path(text)
