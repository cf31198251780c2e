"""Images for the multimodal path: decode a file once (at prepare time) into a fixed-size uint8 RGB
array, or refuse it with one line naming the file. Training reads the stored arrays, never the files.

Only Pillow; nothing here imports torch or transformers, so `llmlabs prepare` stays light."""
import struct

import numpy as np

from llmlabs.common import LabError

# Larger images are refused before their pixels are decoded: a 50k x 50k PNG is a few KB on disk but
# 7.5 GB in memory (a "decompression bomb"). 64 MP is above any camera a caption set comes from.
MAX_PIXELS = 64_000_000
# 8-bit modes that convert to RGB without losing meaning. 16-bit and float modes (I, I;16, F) are
# scientific data: converting clips them to 0..255 silently, so they are refused instead.
CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"}


def load_image(path, size: int, name: str | None = None) -> np.ndarray:
    """The image at `path` (or in a binary file object, e.g. image bytes from a parquet row, which
    error lines call `name`) as uint8 [size, size, 3] RGB. Resized (bicubic) to the square without
    cropping, as SigLIP's own image processor does (a crop would cut off what a caption may name at
    the edge, e.g. "at the top left"); alpha is dropped (not composited: the colour under a
    transparent pixel stays), a palette is expanded, and an animation gives its first frame. Raises
    one LabError line naming the file for a missing, unreadable, corrupt, truncated, huge or
    non-8-bit image."""
    from PIL import Image, UnidentifiedImageError

    name = str(path) if name is None else name
    try:
        with Image.open(path) as im:  # lazy: reads the header only
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise LabError(f"image {name} is {w} x {h} pixels, over the {MAX_PIXELS:,}-pixel limit: "
                               f"downscale it first (e.g. to {size} x {size})")
            if im.mode not in CONVERTIBLE_MODES:
                raise LabError(f"image {name} has mode {im.mode} (not 8-bit colour or grey): convert it to "
                               f"8-bit RGB first")
            rgb = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise LabError(f"image {name} does not exist: check the path") from None
    except UnidentifiedImageError:
        raise LabError(f"image {name} is not an image Pillow can read (corrupt, or not an image): replace "
                       f"or remove it") from None
    except Image.DecompressionBombError:  # Pillow's own check, at open, for sizes far over its limit
        raise LabError(f"image {name} is over the {MAX_PIXELS:,}-pixel limit: downscale it first (e.g. to "
                       f"{size} x {size})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        # truncated data ("image file is truncated"), broken chunks, bad headers
        why = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise LabError(f"image {name} cannot be decoded ({why}): replace or remove it") from None
    return np.asarray(rgb, dtype=np.uint8)
