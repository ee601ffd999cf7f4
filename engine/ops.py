"""The augmentation registry: every op a recipe may name, defined once.

An entry (Op) holds the op's parameter schema (ranges and defaults: a recipe
is checked against it when it is built, engine/recipes.py), how its values
are drawn for one sample from the sample's numpy Generator (seeded from the
counter-based seed in the reader worker, engine/pipeline.py), and its
implementation on each backend (docs/architecture.md): OpenCV on uint8 in
the reader workers (engine/worker_ops.py), and for the dali backend a DALI
operator (photometric) or a torch function on the batch (geometric,
engine/augment.py). Adding an op is one entry here plus its tests.

Kinds:
  photometric  RGB only. Draws (a vector of `count` numbers, an extra array
               or None), handed to DALI as per-sample external-source inputs
               (engine/photometric.py) or applied with OpenCV.
  geometric    moves all image channels (ELA included) and the mask together
               (masks nearest, images bilinear, zeros outside: mirrored
               content would look like an unlabelled copy-move forgery), or
               (coarse_dropout) blanks RGB only. Draws rows of values, one
               per action; both backends apply the same rows, so one seed
               gives one transform on either.

Units follow the reference pipeline (albumentations): hue_saturation_value's
integer hue limit is in OpenCV units (180 per turn); an integer saturation
or value limit L is an additive change of up to L/255 of the range, applied
as the factor 1 +- L/255; a tuple is a factor range. color_jitter follows
torchvision (factors 1 +- x, hue in turns). contrast_brightness is
x * contrast + brightness (0-255 units), brightness_contrast is
albumentations' x * (1 + c) + 255 b. gaussian_blur draws an odd kernel size
and uses OpenCV's sigma for it. motion_blur convolves with a line of the
kernel's length at a uniformly random angle. DALI's colour twist acts in
YIQ space, contrast pivoting on the middle of the uint8 range; the OpenCV
versions do the same. coarse_dropout's sizes are output pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

_UINT8_MAX = 255.0
_HALF_RANGE = 128.0
_OPENCV_HUE_DEGREES = 2.0   # OpenCV's 8-bit hue: 180 units per 360 degrees
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ_TO_RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]])


@dataclass(frozen=True)
class Param:
    """A number in [low, high], or ("pair") a (a, b) with low <= a <= b <= high,
    or ("either") one of the two; `integer` wants ints."""

    low: float
    high: float
    default: object
    form: str = "number"
    integer: bool = False

    def accepts(self, value) -> bool:
        forms = {"number": (False,), "pair": (True,), "either": (False, True)}[self.form]
        pair = isinstance(value, (tuple, list))
        values = tuple(value) if pair else (value,)
        kind = int if self.integer else (int, float)
        return (pair in forms and len(values) == (2 if pair else 1)
                and all(isinstance(v, kind) and not isinstance(v, bool) and self.low <= v <= self.high
                        for v in values) and values[0] <= values[-1])

    def describe(self) -> str:
        one = f"{'an integer' if self.integer else 'a number'} in [{self.low}, {self.high}]"
        pair = (f"a pair (a, b), a <= b, of {'integers' if self.integer else 'numbers'} "
                f"in [{self.low}, {self.high}]")
        return {"number": one, "pair": pair, "either": f"{one} or {pair}"}[self.form]


@dataclass(frozen=True)
class Op:
    name: str
    kind: str                                  # "photometric" | "geometric"
    params: dict[str, Param]
    draw: Callable                             # (params, rng, size) -> see the module docstring
    opencv: Callable                           # photometric (image, vector, extra); geometric (arrays, row)
    dali: Callable | None = None               # photometric: DALI nodes (image, vector, extra)
    # geometric: (images NCHW, masks N1HW, values, values_on_device) -> both, for N
    # samples whose rows share the op and its `group` key (values: their rows'
    # values N x (ROW_WIDTH - 1), numpy on the CPU, and as a tensor on the images' device)
    torch: Callable | None = None
    group: Callable = field(default=lambda values: ())   # geometric: samples applied together
    count: int = 0                             # photometric: numbers in the drawn vector
    idle: np.ndarray | None = None             # photometric: the extra input of a sample it skips
    extra_on_device: bool = False              # photometric: the extra input moves to the GPU
    rows: Callable = field(default=lambda params: 1)   # geometric: most rows one draw makes


def _dali():
    # here, not at import: recipes import this module, and prediction runs without DALI
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath
    return fn, types, dmath


def _u(rng, limit):
    return rng.uniform(-limit, limit)


# --- photometric ------------------------------------------------------------

def _lookup(image, scale, shift):
    table = np.clip(np.rint(np.arange(256) * float(scale) + float(shift)), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def _twist(image, brightness=1.0, contrast=1.0, hue=0.0, saturation=1.0, value=1.0):
    angle = np.deg2rad(hue)
    rotate = np.array([[1, 0, 0], [0, np.cos(angle), np.sin(angle)], [0, -np.sin(angle), np.cos(angle)]])
    matrix = (brightness * contrast * value) * (_YIQ_TO_RGB @ rotate @ np.diag([1, saturation, saturation])
                                                @ _RGB_TO_YIQ)
    offset = np.full((3, 1), (_HALF_RANGE - _HALF_RANGE * contrast) * brightness)
    return cv2.transform(image, np.hstack([matrix, offset]))


def _hsv_factor(limit, rng) -> float:
    if isinstance(limit, (tuple, list)):
        return rng.uniform(*limit)
    return 1.0 + _u(rng, limit) / _UINT8_MAX


def _opencv_sigma(kernel_size: int) -> float:
    """The sigma OpenCV (and albumentations' GaussianBlur) use for a kernel size."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def _line_kernel(size: int, rng) -> np.ndarray:
    kernel = np.zeros((size, size), np.float32)
    angle = rng.uniform(0, np.pi)
    half = (size - 1) / 2
    dy, dx = half * np.sin(angle), half * np.cos(angle)
    cv2.line(kernel, (round(half - dx), round(half - dy)), (round(half + dx), round(half + dy)), 1.0)
    return kernel / kernel.sum()


def _blur_kernel(p, rng, size):
    """An odd kernel size in the range, and OpenCV's sigma for it."""
    k = int(rng.choice([k for k in range(p["kernel"][0], p["kernel"][1] + 1) if k % 2]))
    return [k, _opencv_sigma(k)], None


def _jpeg(image, v, extra):
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(v[0])])
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _dali_contrast_shift(image, v, extra):
    return _dali()[0].brightness_contrast(image, contrast=v[0], contrast_center=0.0, brightness_shift=v[1])


def _dali_noise(image, v, extra):
    fn, types, dmath = _dali()
    return fn.cast(dmath.clamp(image + extra, 0, 255), dtype=types.UINT8)


def _dali_int(node):
    fn, types, _ = _dali()
    return fn.cast(node, dtype=types.INT32)


_FACTOR = Param(0, 1, 0.2)
_CONTRAST_SHIFT = dict(kind="photometric", count=2, opencv=lambda image, v, extra: _lookup(
    image, v[0], v[1] * _UINT8_MAX), dali=_dali_contrast_shift)

_PHOTOMETRIC = (
    Op("brightness_mul", "photometric", {"range": Param(0, 4, (0.8, 1.2), "pair")},
       lambda p, rng, size: ([rng.uniform(*p["range"])], None), count=1,
       opencv=lambda image, v, extra: _lookup(image, v[0], 0.0),
       dali=lambda image, v, extra: _dali()[0].brightness_contrast(image, brightness=v[0])),
    Op("contrast_brightness", params={"contrast": Param(0, 4, (0.7, 1.3), "pair"),
                                      "brightness": Param(-255, 255, (-20, 20), "pair")},
       draw=lambda p, rng, size: ([rng.uniform(*p["contrast"]),
                                   rng.uniform(*p["brightness"]) / _UINT8_MAX], None), **_CONTRAST_SHIFT),
    Op("brightness_contrast", params={"brightness": _FACTOR, "contrast": _FACTOR},
       draw=lambda p, rng, size: ([1 + _u(rng, p["contrast"]), _u(rng, p["brightness"])], None),
       **_CONTRAST_SHIFT),
    Op("color_jitter", "photometric",
       {"brightness": _FACTOR, "contrast": _FACTOR, "saturation": _FACTOR, "hue": Param(0, 0.5, 0.1)},
       lambda p, rng, size: ([1 + _u(rng, p["brightness"]), 1 + _u(rng, p["contrast"]),
                              1 + _u(rng, p["saturation"]), 360.0 * _u(rng, p["hue"])], None), count=4,
       opencv=lambda image, v, extra: _twist(image, brightness=v[0], contrast=v[1], saturation=v[2],
                                             hue=v[3]),
       dali=lambda image, v, extra: _dali()[0].color_twist(image, brightness=v[0], contrast=v[1],
                                                           saturation=v[2], hue=v[3])),
    Op("hue_saturation_value", "photometric",
       {"hue": Param(0, 180, 20), "saturation": Param(0, 255, 30, "either"),
        "value": Param(0, 255, 30, "either")},
       lambda p, rng, size: ([_OPENCV_HUE_DEGREES * _u(rng, p["hue"]), _hsv_factor(p["saturation"], rng),
                              _hsv_factor(p["value"], rng)], None), count=3,
       opencv=lambda image, v, extra: _twist(image, hue=v[0], saturation=v[1], value=v[2]),
       dali=lambda image, v, extra: _dali()[0].hsv(image, hue=v[0], saturation=v[1], value=v[2])),
    Op("gaussian_blur", "photometric", {"kernel": Param(1, 31, (3, 7), "pair", integer=True)},
       _blur_kernel, count=2,
       opencv=lambda image, v, extra: cv2.GaussianBlur(image, (int(v[0]), int(v[0])), float(v[1]),
                                                       borderType=cv2.BORDER_REFLECT_101),
       dali=lambda image, v, extra: _dali()[0].gaussian_blur(image, window_size=_dali_int(v[0]),
                                                             sigma=v[1])),
    # float32 draws directly: measured 1.5x cheaper than float64 normal() and a cast
    Op("gaussian_noise", "photometric", {"std": Param(0, 1, (0.01, 0.05), "pair")},
       lambda p, rng, size: ([], rng.standard_normal((size, size, 3), dtype=np.float32)
                             * np.float32(rng.uniform(*p["std"]) * _UINT8_MAX)),
       opencv=lambda image, v, extra: np.rint(np.clip(image + extra, 0, _UINT8_MAX)).astype(np.uint8),
       dali=_dali_noise, idle=np.zeros((1, 1, 3), np.float32), extra_on_device=True),
    Op("motion_blur", "photometric", {"kernel": Param(3, 31, 7, integer=True)},
       lambda p, rng, size: ([], _line_kernel(int(p["kernel"]), rng)),
       opencv=lambda image, v, extra: cv2.filter2D(image, -1, extra, borderType=cv2.BORDER_REFLECT_101),
       dali=lambda image, v, extra: _dali()[0].filter(image, extra, border="reflect_101"),
       idle=np.ones((1, 1), np.float32)),
    Op("jpeg", "photometric", {"quality": Param(1, 100, (70, 100), "pair", integer=True)},
       lambda p, rng, size: ([rng.integers(p["quality"][0], p["quality"][1] + 1)], None), count=1,
       opencv=_jpeg,
       dali=lambda image, v, extra: _dali()[0].jpeg_compression_distortion(image, quality=_dali_int(v[0]))),
)


# --- geometric: each draw is rows of values, applied in order ----------------

# np.rot90 / torch.rot90's k (counterclockwise quarter turns) as OpenCV codes
_COUNTERCLOCKWISE = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def _each(arrays, move):
    return [None if a is None else move(a) for a in arrays]


def _affine_rows(p, rng, size):
    """The matrix cv2.warpAffine takes (destination from source): a turn of
    U(+-rotate) degrees and a scale of U(1 +- scale) about the centre, then a
    shift of U(+-shift) of the side on each axis."""
    angle, scale = _u(rng, p["rotate"]), rng.uniform(1 - p["scale"], 1 + p["scale"])
    shift = p["shift"] * size
    centre = (size - 1) / 2
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, scale)
    matrix[:, 2] += (_u(rng, shift), _u(rng, shift))
    return [matrix.reshape(-1)]


def _warp_opencv(arrays, row):
    matrix = np.asarray(row[:6], np.float64).reshape(2, 3)
    size = arrays[0].shape[0]
    return [None if a is None else cv2.warpAffine(a, matrix, (size, size), flags=interp,
                                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            for a, interp in zip(arrays, (cv2.INTER_LINEAR, cv2.INTER_NEAREST, cv2.INTER_LINEAR))]


def _warp_torch(images, masks, values, on_device):
    from kornia.geometry.transform import warp_affine
    matrices = on_device[:, :6].reshape(-1, 2, 3).to(images.dtype)
    size = tuple(images.shape[-2:])
    return (warp_affine(images, matrices, size, mode="bilinear", padding_mode="zeros"),
            warp_affine(masks, matrices, size, mode="nearest", padding_mode="zeros"))


def _holes(p, rng, size):
    count = int(rng.integers(p["holes"][0], p["holes"][1] + 1))
    sides = rng.integers(p["size"][0], p["size"][1] + 1, (count, 2))
    corners = (rng.random((count, 2)) * np.maximum(size - sides + 1, 1)).astype(np.int64)
    return list(np.hstack([corners, sides]))


def _blank_opencv(arrays, row):
    top, left, height, width = (int(v) for v in row[:4])
    arrays[0][top:top + height, left:left + width, :3] = 0
    return arrays


def _blank_torch(images, masks, values, on_device):
    # the holes' corners and sides as Python ints: slicing launches no copy back to the CPU
    for image, row in zip(images, values):
        top, left, height, width = (int(v) for v in row[:4])
        image[:3, top:top + height, left:left + width] = 0
    return images, masks


def _turn(k):
    return int(k) % 4


_GEOMETRIC = (
    Op("hflip", "geometric", {}, lambda p, rng, size: [()],
       opencv=lambda arrays, row: _each(arrays, lambda a: cv2.flip(a, 1)),
       torch=lambda images, masks, values, on_device: (images.flip(-1), masks.flip(-1))),
    Op("vflip", "geometric", {}, lambda p, rng, size: [()],
       opencv=lambda arrays, row: _each(arrays, lambda a: cv2.flip(a, 0)),
       torch=lambda images, masks, values, on_device: (images.flip(-2), masks.flip(-2))),
    Op("rot90", "geometric", {"k": Param(0, 3, (1, 3), "pair", integer=True)},
       lambda p, rng, size: [(int(rng.integers(p["k"][0], p["k"][1] + 1)),)],
       # OpenCV's flip and rotate: 20-60x faster than copying numpy's strided views
       opencv=lambda arrays, row: arrays if not _turn(row[0]) else _each(
           arrays, lambda a: cv2.rotate(a, _COUNTERCLOCKWISE[_turn(row[0])])),
       torch=lambda images, masks, values, on_device: tuple(
           t.rot90(_turn(values[0, 0]), dims=(-2, -1)) for t in (images, masks)),
       group=lambda values: _turn(values[0])),
    Op("affine", "geometric", {"shift": Param(0, 0.5, 0.0625), "scale": Param(0, 0.9, 0.1),
                               "rotate": Param(0, 180, 45)},
       _affine_rows, opencv=_warp_opencv, torch=_warp_torch),
    Op("coarse_dropout", "geometric", {"holes": Param(1, 64, (1, 8), "pair", integer=True),
                                       "size": Param(1, 4096, (16, 32), "pair", integer=True)},
       _holes, opencv=_blank_opencv, torch=_blank_torch, rows=lambda p: p["holes"][1]),
)

OPS: dict[str, Op] = {op.name: op for op in _PHOTOMETRIC + _GEOMETRIC}
GEOMETRIC: tuple[str, ...] = tuple(op.name for op in _GEOMETRIC)
PHOTOMETRIC: tuple[str, ...] = tuple(op.name for op in _PHOTOMETRIC)
_P = Param(0, 1, 1.0)
# one row of a geometric draw: the op's index in GEOMETRIC (-1: nothing), then its values
ROW_WIDTH = 7


def with_defaults(name: str, params: dict) -> dict:
    """`params` of op `name` with its defaults filled in, p left out."""
    return {**{key: param.default for key, param in OPS[name].params.items()},
            **{key: value for key, value in params.items() if key != "p"}}


def kind(entry) -> str:
    """An augment entry's kind; a one_of's is the one its ops share."""
    name, params = entry
    if name != "one_of":
        if name not in OPS:
            raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(OPS)}")
        return OPS[name].kind
    kinds = {kind(op) for op in params["ops"]}
    if len(kinds) != 1:
        raise ValueError(f"one_of mixes photometric and other operations: {params['ops']}")
    return kinds.pop()


def validate(member: str, augment) -> None:
    """Refuse an unknown op or parameter, or a value outside the schema, with
    a ValueError naming the member, op and parameter."""
    for name, params in augment:
        where = f"member {member!r}: augmentation {name!r}"
        if name == "one_of":
            if not params.get("ops"):
                raise ValueError(f"{where}: needs a non-empty 'ops'")
            validate(member, params["ops"])
            if len({kind(op) for op in params["ops"]}) > 1:
                raise ValueError(f"{where}: mixes photometric and other operations")
        elif name not in OPS:
            raise ValueError(f"{where}: unknown op; known: {', '.join(OPS)}, one_of")
        schema = {"p": _P, **({"ops": None} if name == "one_of" else OPS[name].params)}
        for key, value in params.items():
            if key not in schema:
                raise ValueError(f"{where}: unknown parameter {key!r}; it takes {', '.join(schema)}")
            if schema[key] is not None and not schema[key].accepts(value):
                raise ValueError(f"{where}: parameter {key!r} = {value!r}; expected {schema[key].describe()}")


def geometric_entries(augment) -> tuple:
    """The entries whose draws are geometry rows (geometric ops and dropout)."""
    return tuple(entry for entry in augment if kind(entry) == "geometric")


def _most_rows(name, params) -> int:
    if name == "one_of":
        return max(_most_rows(*op) for op in params["ops"])
    return OPS[name].rows(with_defaults(name, params))


def row_count(entries) -> int:
    """Rows a sample's geometry takes at most (at least one, so every batch has
    the same shape)."""
    return max(1, sum(_most_rows(*entry) for entry in entries))


def draw_geometry(entries, rng: np.random.Generator, size: int) -> np.ndarray:
    """One sample's geometry, float32 (row_count(entries), ROW_WIDTH): each
    entry acts with its p, a one_of's choice uniform among its ops; unused
    rows have op -1. Each entry has its own rows, at the same place in every
    sample's geometry, so the batch step applies an entry to all the samples
    it acts on at once (engine/augment.py)."""
    out = np.zeros((row_count(entries), ROW_WIDTH), np.float32)
    out[:, 0] = -1
    start = 0
    for name, params in entries:
        at, start = start, start + _most_rows(name, params)
        if rng.random() >= params.get("p", 1.0):
            continue
        if name == "one_of":
            name, params = params["ops"][int(rng.integers(len(params["ops"])))]
        for row in OPS[name].draw(with_defaults(name, params), rng, size):
            out[at, 0] = GEOMETRIC.index(name)
            out[at, 1:1 + len(row)] = row
            at += 1
    return out


def acting_rows(geometry):
    """(op, values) of the rows of one sample's geometry that act."""
    for row in geometry.tolist():
        if row[0] >= 0:
            yield OPS[GEOMETRIC[int(row[0])]], row[1:]
