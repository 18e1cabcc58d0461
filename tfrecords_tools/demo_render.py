"""Draw one synthetic pedestrian crop (128 high × 64 wide, RGB) from its attributes.

The figure is laid out in *person units*: the person is 1 unit tall, ``v`` runs down from the
top of the head, ``u`` runs right from the body's centre line. `_Frame` maps units to pixels, so
pose, scale and position change per image while the proportions stay fixed.

Every attribute gets a cue a small CNN can pick up at this size:

- coat: long body down to just above the knee, centre line, buttons and a belt;
  jacket: waist length with a zip line, stand-up collar and a hem band;
  shirt: short sleeves (skin shows below), collar and button placket;
  sweater: long sleeves with ribbed cuffs, ribbed hem band and a crew neck;
- pants: full-length legs; shorts: end above the knee, skin below; skirt: a flared trapezoid;
- backpack: a dark pack peeking out behind the shoulders plus two straps across the chest;
  handbag: a small bag with a handle hanging from one hand;
- woman: long hair falling to the shoulders, narrower shoulders and wider hips; man: short hair.

A coat hides shorts, so callers must not ask for that pairing (`demo.py` never does).
Backgrounds are muted (low saturation) and textured; their brightness keeps away from the
garments' so white, grey and black clothes stay visible, and a soft dark outline separates the
figure from the background. Lighting changes brightness by at most ±12 % so colours stay named
by the same word.
"""

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

IMAGE_HEIGHT = 128
IMAGE_WIDTH = 64
# Drawing 4× larger and shrinking with a box filter anti-aliases every edge for free.
SUPERSAMPLE = 4

COLOR_RGB = {
    "red": (205, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 40),
    "green": (35, 150, 55),
    "blue": (35, 75, 205),
    "purple": (125, 45, 165),
    "pink": (245, 150, 195),
    "brown": (120, 72, 35),
    "black": (28, 28, 30),
    "white": (242, 242, 238),
    "grey": (128, 128, 128),
}
SKIN_TONES = ((241, 204, 177), (224, 172, 135), (198, 140, 100), (150, 100, 70), (105, 70, 50))
HAIR_TONES = ((25, 22, 20), (55, 40, 28), (80, 60, 40), (40, 35, 35))
# Bags stay neutral so they never read as a garment colour.
BAG_TONES = ((35, 35, 40), (85, 55, 35), (40, 50, 90), (175, 145, 105), (178, 178, 172))
SHOE_RGB = (30, 28, 28)
# Per-identity shade variation of garment colours, in RGB steps.
COLOR_JITTER = 12
# How far (in luminance) backgrounds and bags keep from the garments they sit next to.
MIN_CONTRAST = 45

BODY = {
    # half-widths at the shoulder, waist and hip lines
    "man": {"shoulder": 0.125, "waist": 0.095, "hip": 0.098},
    "woman": {"shoulder": 0.108, "waist": 0.082, "hip": 0.108},
}
SHOULDER_V, WAIST_V, HIP_V = 0.17, 0.44, 0.50
UPPER_ARM, FOREARM = 0.17, 0.16
THIGH, SHIN = 0.235, 0.215
HEM_V = {"coat": 0.675, "jacket": 0.515, "shirt": 0.485, "sweater": 0.495}
SHORTS_FRACTION = 0.55  # of the thigh, so shorts end well above the knee
SKIRT_HEM_V, SKIRT_HEM_HALF_WIDTH = 0.745, 0.165

Point = tuple[float, float]
Rgb = tuple[int, int, int]


@dataclass(frozen=True)
class Look:
    """What stays the same across one identity's images, besides the attributes."""

    upper_rgb: Rgb
    lower_rgb: Rgb
    skin_rgb: Rgb
    hair_rgb: Rgb
    bag_rgb: Rgb
    handbag_side: int  # -1: bag in the left hand of the image, +1: right


@dataclass(frozen=True)
class Pose:
    """What changes from one image of a person to the next (angles in radians)."""

    height_fraction: float  # person height / image height
    center_offset: float  # horizontal shift, fraction of image width
    foot_margin: float  # gap under the feet, fraction of image height
    arm_spread: tuple[float, float]  # upper arm angle away from the body, left and right
    elbow_bend: tuple[float, float]  # extra forearm angle, left and right
    leg_spread: tuple[float, float]  # thigh angle away from the body, left and right
    knee_bend: tuple[float, float]


def luminance(rgb: Rgb) -> float:
    """Perceived brightness 0..255 (ITU-R BT.601 weights)."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def sample_look(attributes: Mapping[str, str], rng: np.random.Generator) -> Look:
    """Draw an identity's fixed appearance: garment shades, skin, hair and bag colour."""

    def jittered(color: str) -> Rgb:
        shift = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        return tuple(int(value) for value in np.clip(np.add(COLOR_RGB[color], shift), 0, 255))

    upper_rgb = jittered(attributes["upper_color"])
    lower_rgb = jittered(attributes["lower_color"])
    # A backpack's straps lie on the upper garment, a handbag hangs beside the lower one.
    neighbour = upper_rgb if attributes["bag"] == "backpack" else lower_rgb
    bag_choices = [tone for tone in BAG_TONES if abs(luminance(tone) - luminance(neighbour)) >= MIN_CONTRAST]
    return Look(
        upper_rgb=upper_rgb,
        lower_rgb=lower_rgb,
        skin_rgb=SKIN_TONES[rng.integers(len(SKIN_TONES))],
        hair_rgb=HAIR_TONES[rng.integers(len(HAIR_TONES))],
        bag_rgb=bag_choices[rng.integers(len(bag_choices))],
        handbag_side=int(rng.choice((-1, 1))),
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    """Draw one image's scale, placement and limb angles."""

    def pair(low: float, high: float) -> tuple[float, float]:
        return float(rng.uniform(low, high)), float(rng.uniform(low, high))

    return Pose(
        height_fraction=float(rng.uniform(0.80, 0.92)),
        center_offset=float(rng.uniform(-0.07, 0.07)),
        foot_margin=float(rng.uniform(0.01, 0.05)),
        arm_spread=pair(0.10, 0.38),
        elbow_bend=pair(-0.25, 0.30),
        leg_spread=pair(0.0, 0.14),
        knee_bend=pair(-0.06, 0.06),
    )


@dataclass(frozen=True)
class _Frame:
    """Maps person units (u right, v down, person height 1) to canvas pixels."""

    center_x: float
    top_y: float
    height: float

    def point(self, u: float, v: float) -> Point:
        return (self.center_x + u * self.height, self.top_y + v * self.height)


class _Painter:
    """Draws shapes in person units on the picture and, in white, on the figure mask."""

    def __init__(self, picture: Image.Image, mask: Image.Image, frame: _Frame):
        self._picture = ImageDraw.Draw(picture)
        self._mask = ImageDraw.Draw(mask)
        self._frame = frame

    def polygon(self, points: list[Point], fill: Rgb) -> None:
        pixels = [self._frame.point(u, v) for u, v in points]
        self._picture.polygon(pixels, fill=fill)
        self._mask.polygon(pixels, fill=255)

    def ellipse(self, center: Point, radius_u: float, radius_v: float, fill: Rgb) -> None:
        left, top = self._frame.point(center[0] - radius_u, center[1] - radius_v)
        right, bottom = self._frame.point(center[0] + radius_u, center[1] + radius_v)
        self._picture.ellipse((left, top, right, bottom), fill=fill)
        self._mask.ellipse((left, top, right, bottom), fill=255)

    def band(self, left: float, right: float, top: float, bottom: float, fill: Rgb) -> None:
        """An axis-aligned rectangle: belts, hems, rib bands."""
        self.polygon([(left, top), (right, top), (right, bottom), (left, bottom)], fill)

    def limb(self, start: Point, end: Point, width_start: float, width_end: float, fill: Rgb) -> None:
        """A tapered segment with round ends, like a limb or sleeve."""
        direction = np.subtract(end, start)
        normal = np.array([-direction[1], direction[0]]) / max(float(np.hypot(*direction)), 1e-9)
        half_start, half_end = normal * width_start / 2, normal * width_end / 2
        self.polygon(
            [tuple(start + half_start), tuple(end + half_end), tuple(end - half_end), tuple(start - half_start)],
            fill,
        )
        self.ellipse(start, width_start / 2, width_start / 2, fill)
        self.ellipse(end, width_end / 2, width_end / 2, fill)

    def line(self, points: list[Point], width: float, fill: Rgb) -> None:
        """A thin detail line (seam, zip, strap edge) inside the figure."""
        pixels = [self._frame.point(u, v) for u, v in points]
        self._picture.line(pixels, fill=fill, width=max(1, round(width * self._frame.height)))


def detail_shade(rgb: Rgb) -> Rgb:
    """A shade that stands out on `rgb`: darker for most colours, lighter for very dark ones."""
    if luminance(rgb) > 70:
        return tuple(int(value * 0.6) for value in rgb)
    return tuple(int(value * 0.5 + 95) for value in rgb)


def _along(start: Point, end: Point, fraction: float) -> Point:
    return (start[0] + (end[0] - start[0]) * fraction, start[1] + (end[1] - start[1]) * fraction)


def _limb_joints(
    root: Point, side: int, spread: float, bend: float, lengths: tuple[float, float]
) -> tuple[Point, Point, Point]:
    """Root, middle and end joints of a two-segment limb hanging down, angled outward on `side`."""
    middle = (root[0] + side * lengths[0] * np.sin(spread), root[1] + lengths[0] * np.cos(spread))
    # The forearm/shin may swing back towards the body, but never across it.
    lower_angle = max(spread + bend, 0.0)
    end = (middle[0] + side * lengths[1] * np.sin(lower_angle), middle[1] + lengths[1] * np.cos(lower_angle))
    return root, middle, end


def _background(garment_luminances: list[float], rng: np.random.Generator) -> np.ndarray:
    """A muted, textured wall-and-ground background, (IMAGE_HEIGHT, IMAGE_WIDTH, 3) float."""
    candidates = rng.uniform(70, 200, size=12)
    distances = np.min(np.abs(candidates[:, None] - np.array(garment_luminances)[None, :]), axis=1)
    contrasting = candidates[distances >= MIN_CONTRAST]
    brightness = contrasting[0] if contrasting.size else candidates[np.argmax(distances)]

    def muted_color(level: float) -> np.ndarray:
        tint = rng.uniform(-1, 1, size=3)
        return level + 18 * (tint - tint.mean())

    wall = muted_color(brightness)
    ground = muted_color(float(np.clip(brightness + rng.uniform(-40, 40), 60, 210)))
    rows = np.arange(IMAGE_HEIGHT)[:, None, None]
    horizon = rng.uniform(0.70, 0.88) * IMAGE_HEIGHT
    background = np.where(rows < horizon, wall, ground) * np.ones((1, IMAGE_WIDTH, 1))
    # Blotchy texture: coarse noise smoothly blown up to the image size.
    coarse = rng.normal(0, 7, size=(IMAGE_HEIGHT // 8, IMAGE_WIDTH // 8)).astype(np.float32)
    blotches = Image.fromarray(coarse, mode="F").resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.BILINEAR)
    background += np.asarray(blotches, dtype=np.float64)[..., None]
    if rng.random() < 0.5:
        # Panel seams or window frames on the wall.
        spacing = int(rng.integers(10, 22))
        seams = (np.arange(IMAGE_WIDTH) + int(rng.integers(spacing))) % spacing == 0
        background[: int(horizon), seams] *= 0.8
    return background


def _outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Darken a thin band just outside the figure so it separates from any background."""
    padded = np.pad(mask, 1)
    neighbours = np.maximum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    band = np.clip(neighbours - mask, 0, 1)[..., None]
    return image * (1 - 0.45 * band)


def render_person(attributes: Mapping[str, str], look: Look, rng: np.random.Generator) -> Image.Image:
    """One RGB image (IMAGE_WIDTH × IMAGE_HEIGHT) of the person in a freshly drawn pose and scene."""
    pose = sample_pose(rng)
    background = _background([luminance(look.upper_rgb), luminance(look.lower_rgb)], rng)
    size = (IMAGE_WIDTH * SUPERSAMPLE, IMAGE_HEIGHT * SUPERSAMPLE)
    picture = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    mask = Image.new("L", size, 0)
    person_height = pose.height_fraction * size[1]
    frame = _Frame(
        center_x=size[0] / 2 + pose.center_offset * size[0],
        top_y=size[1] * (1 - pose.foot_margin) - person_height,
        height=person_height,
    )
    _draw_person(_Painter(picture, mask, frame), attributes, look, pose)

    small = np.asarray(picture.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.BOX), dtype=np.float64)
    small_mask = np.asarray(mask.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.BOX), dtype=np.float64) / 255
    lit = _outline(small, small_mask) * rng.uniform(0.88, 1.12) * rng.uniform(0.97, 1.03, size=3)
    noisy = lit + rng.normal(0, rng.uniform(2, 6), size=lit.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mode="RGB")


def _draw_person(paint: _Painter, attributes: Mapping[str, str], look: Look, pose: Pose) -> None:
    """Back to front: bag body, hair, legs, lower garment, torso, straps, arms, head, handbag."""
    gender, upper, lower, bag = attributes["gender"], attributes["upper"], attributes["lower"], attributes["bag"]
    body = BODY[gender]
    if bag == "backpack":
        paint.polygon([(-0.15, 0.14), (0.15, 0.14), (0.165, 0.43), (-0.165, 0.43)], look.bag_rgb)
    if gender == "woman":
        paint.polygon([(-0.066, 0.05), (0.066, 0.05), (0.088, 0.26), (-0.088, 0.26)], look.hair_rgb)
    _draw_legs_and_lower(paint, lower, look, pose, body)
    _draw_torso(paint, upper, look, body)
    if bag == "backpack":
        for side in (-1, 1):
            strap = [(side * 0.05, 0.155), (side * 0.085, 0.155), (side * 0.095, 0.41), (side * 0.06, 0.41)]
            paint.polygon(strap, look.bag_rgb)
    hands = _draw_arms(paint, upper, look, pose, body)
    _draw_head(paint, gender, look)
    if bag == "handbag":
        _draw_handbag(paint, hands[(look.handbag_side + 1) // 2], look.handbag_side, look.bag_rgb)


def _draw_legs_and_lower(paint: _Painter, lower: str, look: Look, pose: Pose, body: dict) -> None:
    """Legs (in the trouser colour or bare), shoes, then the shorts or skirt over them."""
    covered = lower == "pants"
    leg_color = look.lower_rgb if covered else look.skin_rgb
    widen = 0.014 if covered else 0.0  # trousers are looser than bare legs
    legs = []
    for index, side in enumerate((-1, 1)):
        hip, knee, ankle = _limb_joints(
            (side * 0.05, HIP_V), side, pose.leg_spread[index], pose.knee_bend[index], (THIGH, SHIN)
        )
        legs.append((hip, knee))
        paint.limb(hip, knee, 0.072 + widen, 0.056 + widen, leg_color)
        paint.limb(knee, ankle, 0.056 + widen, 0.046 + widen, leg_color)
        paint.ellipse((ankle[0] + side * 0.012, ankle[1] + 0.02), 0.04, 0.022, SHOE_RGB)

    if lower == "skirt":
        paint.polygon(
            [(-body["waist"], WAIST_V - 0.01), (body["waist"], WAIST_V - 0.01),
             (SKIRT_HEM_HALF_WIDTH, SKIRT_HEM_V), (-SKIRT_HEM_HALF_WIDTH, SKIRT_HEM_V)],
            look.lower_rgb,
        )
        return
    paint.polygon(
        [(-body["waist"], WAIST_V - 0.01), (body["waist"], WAIST_V - 0.01),
         (body["hip"], HIP_V + 0.035), (0.0, HIP_V + 0.05), (-body["hip"], HIP_V + 0.035)],
        look.lower_rgb,
    )
    if lower == "shorts":
        for hip, knee in legs:
            paint.limb(hip, _along(hip, knee, SHORTS_FRACTION), 0.1, 0.09, look.lower_rgb)


def _draw_torso(paint: _Painter, upper: str, look: Look, body: dict) -> None:
    """Neck, the upper garment's body down to its hem, and the details that tell garments apart."""
    color, detail = look.upper_rgb, detail_shade(look.upper_rgb)
    paint.polygon([(-0.028, 0.11), (0.028, 0.11), (0.03, 0.18), (-0.03, 0.18)], look.skin_rgb)
    shoulder, waist, hip, hem_v = body["shoulder"], body["waist"], body["hip"], HEM_V[upper]
    hem_half_width = {"coat": 0.135, "jacket": hip + 0.01, "shirt": hip, "sweater": hip}[upper]
    outline = [
        (-0.035, SHOULDER_V - 0.015), (-shoulder + 0.02, SHOULDER_V), (-shoulder, SHOULDER_V + 0.035),
        (-waist, WAIST_V), (-hem_half_width, hem_v), (hem_half_width, hem_v), (waist, WAIST_V),
        (shoulder, SHOULDER_V + 0.035), (shoulder - 0.02, SHOULDER_V), (0.035, SHOULDER_V - 0.015),
    ]
    paint.polygon(outline, color)

    if upper == "coat":
        paint.line([(0.0, 0.24), (0.0, hem_v)], 0.01, detail)
        paint.polygon([(-0.045, SHOULDER_V - 0.01), (0.0, 0.25), (-0.02, SHOULDER_V - 0.01)], detail)
        paint.polygon([(0.045, SHOULDER_V - 0.01), (0.0, 0.25), (0.02, SHOULDER_V - 0.01)], detail)
        paint.band(-waist, waist, WAIST_V - 0.025, WAIST_V, detail)
        for button_v in (0.28, 0.34, 0.52, 0.58):
            for side in (-1, 1):
                paint.ellipse((side * 0.028, button_v), 0.011, 0.011, detail)
    elif upper == "jacket":
        # A zip wide enough to survive shrinking to 64 x 32, which tells a jacket from a sweater.
        paint.band(-0.06, 0.06, SHOULDER_V - 0.04, SHOULDER_V + 0.015, detail)
        paint.line([(0.0, SHOULDER_V), (0.0, hem_v)], 0.03, detail)
        paint.band(-hem_half_width, hem_half_width, hem_v - 0.03, hem_v, detail)
    elif upper == "shirt":
        for side in (-1, 1):
            collar_tip = (side * 0.005, SHOULDER_V + 0.045)
            paint.polygon([(side * 0.03, SHOULDER_V - 0.02), (side * 0.065, SHOULDER_V + 0.01), collar_tip], detail)
        paint.line([(0.0, SHOULDER_V + 0.04), (0.0, hem_v)], 0.006, detail)
        for button_v in (0.25, 0.31, 0.37, 0.43):
            paint.ellipse((0.0, button_v), 0.009, 0.009, detail)
    else:
        paint.ellipse((0.0, SHOULDER_V - 0.008), 0.045, 0.022, detail)
        paint.ellipse((0.0, SHOULDER_V - 0.012), 0.03, 0.014, look.skin_rgb)
        _ribs(paint, -hem_half_width, hem_half_width, hem_v - 0.04, hem_v, color)


def _ribs(paint: _Painter, left: float, right: float, top: float, bottom: float, color: Rgb) -> None:
    """A knitted rib band: a darker strip crossed by vertical lines in the garment colour."""
    paint.band(left, right, top, bottom, detail_shade(color))
    for rib_u in np.arange(left + 0.012, right, 0.022):
        paint.line([(float(rib_u), top), (float(rib_u), bottom)], 0.006, color)


def _draw_arms(paint: _Painter, upper: str, look: Look, pose: Pose, body: dict) -> list[Point]:
    """Both arms with the garment's sleeves; returns the hand centres (left, right)."""
    hands = []
    sleeve = 0.075 if upper == "coat" else 0.066
    for index, side in enumerate((-1, 1)):
        shoulder, elbow, wrist = _limb_joints(
            (side * (body["shoulder"] - 0.02), SHOULDER_V + 0.025),
            side,
            pose.arm_spread[index],
            pose.elbow_bend[index],
            (UPPER_ARM, FOREARM),
        )
        if upper == "shirt":
            paint.limb(shoulder, elbow, 0.05, 0.045, look.skin_rgb)
            paint.limb(elbow, wrist, 0.045, 0.038, look.skin_rgb)
            paint.limb(shoulder, _along(shoulder, elbow, 0.5), 0.07, 0.068, look.upper_rgb)
        else:
            paint.limb(shoulder, elbow, sleeve, sleeve - 0.006, look.upper_rgb)
            paint.limb(elbow, wrist, sleeve - 0.006, sleeve - 0.012, look.upper_rgb)
            if upper == "sweater":
                cuff_start = _along(elbow, wrist, 0.78)
                paint.limb(cuff_start, wrist, sleeve - 0.008, sleeve - 0.012, detail_shade(look.upper_rgb))
        hand = _along(elbow, wrist, 1.18)
        paint.ellipse(hand, 0.026, 0.028, look.skin_rgb)
        hands.append(hand)
    return hands


def _draw_head(paint: _Painter, gender: str, look: Look) -> None:
    """Face plus hair: a short cap for men; for women also strands falling over the shoulders."""
    if gender == "woman":
        for side in (-1, 1):
            strand = [(side * 0.035, 0.04), (side * 0.07, 0.06), (side * 0.082, 0.25), (side * 0.045, 0.24)]
            paint.polygon(strand, look.hair_rgb)
    paint.ellipse((0.0, 0.072), 0.05, 0.06, look.skin_rgb)
    # A woman's fringe reaches a little lower and wider than a man's short cut.
    side_u, side_v, middle_v = (0.058, 0.06, 0.035) if gender == "woman" else (0.052, 0.055, 0.03)
    paint.polygon(
        [(-side_u, side_v), (-0.045, 0.02), (0.0, 0.008), (0.045, 0.02), (side_u, side_v), (0.0, middle_v)],
        look.hair_rgb,
    )


def _draw_handbag(paint: _Painter, hand: Point, side: int, color: Rgb) -> None:
    """A small bag hanging from `hand` by a handle, shifted outward so it clears the legs."""
    # Sized to stay a few pixels wide at 64 x 32, where models of the demo look at it.
    center_u, top_v = hand[0] + side * 0.03, hand[1] + 0.03
    handle = detail_shade(color) if luminance(color) > 70 else (150, 150, 150)
    paint.line([hand, (center_u - 0.04, top_v), (center_u + 0.04, top_v), hand], 0.01, handle)
    bottom_v = top_v + 0.13
    paint.polygon(
        [(center_u - 0.08, top_v), (center_u + 0.08, top_v), (center_u + 0.09, bottom_v), (center_u - 0.09, bottom_v)],
        color,
    )
    paint.line([(center_u - 0.06, top_v + 0.03), (center_u + 0.06, top_v + 0.03)], 0.008, detail_shade(color))
