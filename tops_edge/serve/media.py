"""A request's `image_url` as a PIL image: `data:` URIs (base64) always, `file://` only under the
allowed local directory, http(s) only when remote media is allowed (with a size and a time limit).
Every refusal is an ApiError; the pixel cap is checked from the image's header, before it is decoded."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import ApiError, bad_request

PARAM = "messages"


@dataclass(frozen=True)
class MediaPolicy:
    #: file:// URLs are read only under this directory (None: refused)
    allowed_local_path: Path | None = None
    #: http(s) URLs are fetched (False: refused)
    allow_remote: bool = False
    #: an image of more pixels (width x height) is refused with 413
    max_image_pixels: int = 4096 * 4096
    #: an encoded image of more bytes is refused with 413 (data: URI, file or download)
    max_image_bytes: int = 32 * 2**20
    #: a download that takes longer is refused
    remote_timeout_s: float = 10.0


def _too_large(message: str) -> ApiError:
    return ApiError(413, message, param=PARAM, code="image_too_large")


def _forbidden(message: str) -> ApiError:
    return ApiError(403, message, type="permission_error", param=PARAM, code="media_not_allowed")


def decode_image(data: bytes, policy: MediaPolicy, what: str):
    """Bytes -> an RGB PIL image. The pixel cap is checked on the header (no pixels decoded yet)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > policy.max_image_pixels:
                raise _too_large(f"{what} is {width}x{height} = {width * height} pixels, over this server's cap of "
                                 f"{policy.max_image_pixels} (tops-serve --max-image-pixels)")
            img.load()
            return img.convert("RGB")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(f"{what} has too many pixels to decode safely") from None
    except UnidentifiedImageError:
        raise bad_request(f"{what} is not an image this server can decode (PNG, JPEG, WebP, ...)", "invalid_image",
                          PARAM) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"{what} is corrupt: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          "invalid_image", PARAM) from None


def _data_uri(url: str, policy: MediaPolicy) -> bytes:
    head, comma, payload = url[5:].partition(",")
    if not comma:
        raise bad_request("a data: URI needs a ',' before its data", "invalid_image_url", PARAM)
    kinds = [part.strip().lower() for part in head.split(";")]
    media_type = kinds[0] or "text/plain"
    if not media_type.startswith("image/"):
        raise bad_request(f"the data: URI holds '{media_type}', not an image (data:image/png;base64,...)",
                          "invalid_image", PARAM)
    if "base64" not in kinds[1:]:
        raise bad_request("a data: URI image must be base64 (data:image/png;base64,...)", "invalid_image_url", PARAM)
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > policy.max_image_bytes:
        raise _too_large(f"the image is over this server's {policy.max_image_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data: URI's base64 does not decode", "invalid_image", PARAM) from None


def _local_file(url: str, policy: MediaPolicy) -> tuple[bytes, str]:
    if policy.allowed_local_path is None:
        raise _forbidden("file:// images are off on this server (start tops-serve with --allowed-local-media-path DIR)")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"file:// URLs name a local path, not a host ('{parsed.netloc}')", "invalid_image_url", PARAM)
    root = policy.allowed_local_path.resolve()
    path = Path(unquote(parsed.path)).resolve()  # symlinks and '..' resolved before the check
    if not path.is_relative_to(root):
        raise _forbidden(f"{path} is outside this server's allowed media directory")
    if not path.is_file():
        raise bad_request(f"image {path} does not exist", "invalid_image", PARAM)
    if path.stat().st_size > policy.max_image_bytes:
        raise _too_large(f"image {path} is over this server's {policy.max_image_bytes} bytes")
    return path.read_bytes(), f"image {path}"


async def _remote(url: str, policy: MediaPolicy, client) -> bytes:
    import httpx

    if not policy.allow_remote:
        raise _forbidden("http(s) image URLs are off on this server (start tops-serve with --allow-remote-media, "
                         "or send the image as a data: URI)")

    async def fetch() -> bytes:
        async with client.stream("GET", url, timeout=policy.remote_timeout_s) as response:
            if response.status_code != 200:
                raise bad_request(f"fetching the image gave HTTP {response.status_code}", "invalid_image_url", PARAM)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > policy.max_image_bytes:
                raise _too_large(f"the image at that URL is over this server's {policy.max_image_bytes} bytes")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > policy.max_image_bytes:
                    raise _too_large(f"the image at that URL is over this server's {policy.max_image_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

    try:
        return await asyncio.wait_for(fetch(), policy.remote_timeout_s)  # the whole download, not each read
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise bad_request(f"fetching the image took longer than {policy.remote_timeout_s:g} s", "invalid_image_url",
                          PARAM) from None
    except httpx.HTTPError as exc:
        raise bad_request(f"cannot fetch the image: {type(exc).__name__}", "invalid_image_url", PARAM) from None


async def load_image(url: str, policy: MediaPolicy, client=None):
    """The image at `url` as an RGB PIL image (decoded in a worker thread, off the event loop)."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url is empty", "invalid_image_url", PARAM)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data, what = _data_uri(url, policy), "the data: URI image"
    elif scheme == "file":
        data, what = await asyncio.to_thread(_local_file, url, policy)
    elif scheme in ("http", "https"):
        data, what = await _remote(url, policy, client), "the image at that URL"
    else:
        raise bad_request(f"image URLs are data:, file:// or http(s), got '{scheme or url[:16]}'", "invalid_image_url",
                          PARAM)
    return await asyncio.to_thread(decode_image, data, policy, what)
