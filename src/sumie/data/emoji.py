"""The emoji recipe: Noto Emoji and Twemoji artwork as a small, real, captioned image set.

``build(out_dir)`` writes an image folder in the Hugging Face ``imagefolder`` layout that
:class:`sumie.data.folder.ImageFolderDataset` reads: ``images/<vendor>/<code>.png`` (the
artwork composited onto white, RGB) and ``metadata.jsonl`` rows ``{"file_name", "text",
"name", "category", "subcategory", "vendor", "unified", "skin_tone", "split"}``, with
``heldout.txt``, ``LICENSES.md``, ``README.md`` and ``manifest.json`` beside them.

The images come from the 64 px PNGs of the npm packages ``emoji-datasource-google``
(Noto Emoji, Apache-2.0) and ``emoji-datasource-twitter`` (Twemoji, CC-BY-4.0) of
iamcal/emoji-data, whose ``emoji.json`` (MIT) gives names and categories. Versions are
pinned and every tarball, fetched with ``npm pack`` or supplied by the user, is checked
against its npm ``dist.integrity`` (SHA-512, Subresource Integrity form) before anything
is written. PNGs are read straight out of the ``.tgz``.

Captions are ``"<name>[, <skin tone>], <category>, <style>"``, e.g. ``"red apple, food and
drink, twemoji style"``. Names are the lower-cased Unicode names of ``emoji.json``, except
where a legacy name misdescribes the picture ("heavy black heart" is red, "black sun with
rays" is a yellow sun): those take the Unicode CLDR short name (``_NAME_OVERRIDES``).

Held-out names (evaluation of prompts never seen in training) are chosen by a hash of the
name, so the choice is stable across package versions and vendors: about 5% of the
non-flag names, plus a few iconic ones whose parts occur elsewhere in the set
(``HELDOUT_ALWAYS``). Country and subdivision flags are never held out: which flag goes
with which country name cannot be inferred from other images.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image


@dataclass(frozen=True)
class EmojiSource:
    """One vendor's npm package (pinned) and the licence of its artwork."""

    vendor: str
    package: str
    version: str
    integrity: str  # npm ``dist.integrity``: "sha512-" + base64(SHA-512 of the .tgz)
    style: str  # the caption's style phrase
    artwork: str
    copyright: str
    license: str
    license_url: str
    source_url: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def tarball_name(self) -> str:
        return f"{self.package}-{self.version}.tgz"


SOURCES: dict[str, EmojiSource] = {
    "google": EmojiSource(
        "google", "emoji-datasource-google", "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        "noto emoji style", "Noto Emoji v2.048", "Copyright Google Inc.", "Apache License 2.0",
        "https://www.apache.org/licenses/LICENSE-2.0", "https://github.com/googlefonts/noto-emoji"),
    "twitter": EmojiSource(
        "twitter", "emoji-datasource-twitter", "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        "twemoji style", "Twemoji v16.0.1 (jdecked/twemoji fork)",
        "Copyright Twitter, Inc and other contributors", "Creative Commons Attribution 4.0 International (CC-BY-4.0)",
        "https://creativecommons.org/licenses/by/4.0/", "https://github.com/jdecked/twemoji"),
}
VENDORS: tuple[str, ...] = tuple(SOURCES)
SOURCE_SIZE = 64  # the packages' per-emoji PNGs are 64x64

HELDOUT_FRACTION = 0.05
HELDOUT_SALT = "sumie-emoji-heldout-v1"
HELDOUT_ALWAYS: tuple[str, ...] = ("red apple", "red heart", "cat face", "sun with face")
UNHOLDABLE_SUBCATEGORIES = ("country-flag", "subdivision-flag")

SKIN_TONES: dict[str, str] = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium",
                              "1F3FE": "medium-dark", "1F3FF": "dark"}
SKIPPED_CATEGORIES = ("Component",)  # the five bare skin-tone swatches

# Unicode names that misdescribe the picture (legacy "black" = filled, "heavy" = bold, old
# gendered or object names) -> Unicode CLDR short names (unicode.org/cldr, Unicode License v3).
_NAME_OVERRIDES: dict[str, str] = {
    "0023-FE0F-20E3": "keycap #", "002A-FE0F-20E3": "keycap *", "1F0CF": "joker",
    "2764-FE0F": "red heart", "2600-FE0F": "sun", "263A-FE0F": "smiling face", "2B50": "star",
    "261D-FE0F": "index pointing up", "1F446": "backhand index pointing up",
    "1F447": "backhand index pointing down", "1F448": "backhand index pointing left",
    "1F449": "backhand index pointing right",
    "23E9": "fast-forward button", "23EA": "fast reverse button", "23EB": "fast up button",
    "23EC": "fast down button", "25B6-FE0F": "play button", "25C0-FE0F": "reverse button",
    "27A1-FE0F": "right arrow", "2B05-FE0F": "left arrow", "2B06-FE0F": "up arrow", "2B07-FE0F": "down arrow",
    "2660-FE0F": "spade suit", "2663-FE0F": "club suit", "2665-FE0F": "heart suit", "2666-FE0F": "diamond suit",
    "260E-FE0F": "telephone", "2702-FE0F": "scissors", "267B-FE0F": "recycling symbol",
    "2705": "check mark button", "2714-FE0F": "check mark", "2716-FE0F": "multiply",
    "2734-FE0F": "eight-pointed star", "2753": "red question mark", "2754": "white question mark",
    "2755": "white exclamation mark", "2757": "red exclamation mark", "2795": "plus", "2796": "minus",
    "2797": "divide", "2B55": "hollow red circle",
    "1F52B": "water pistol", "1F52A": "kitchen knife", "1F5FF": "moai", "1F47F": "angry face with horns",
    "1F4BB": "laptop", "1F635": "face with crossed-out eyes", "1F917": "smiling face with open hands",
    "1F621": "enraged face", "1F699": "sport utility vehicle", "1F6D1": "stop sign",
    "1F472": "person with skullcap", "1F473": "person wearing turban", "1F935": "person in tuxedo",
    "1F483": "woman dancing", "1F482": "guard", "1F3C3": "person running", "1F3C4": "person surfing",
    "1F3CA": "person swimming", "1F6A3": "person rowing boat", "1F6B4": "person biking",
    "1F6B5": "person mountain biking", "1F6B6": "person walking", "1F6C0": "person taking bath",
    "1F6CC": "person in bed", "1F486": "person getting massage", "1F487": "person getting haircut",
    "1F481": "person tipping hand", "1F645": "person gesturing no", "1F646": "person gesturing ok",
    "1F64B": "person raising hand", "1F64E": "person pouting", "1F926": "person facepalming",
    "1F937": "person shrugging", "1F939": "person juggling", "1F93A": "person fencing",
    "1F93C": "people wrestling", "1F93D": "person playing water polo", "1F93E": "person playing handball",
}
_WORD_FIXES = {"womans": "woman's", "mans": "man's", "mens": "men's", "womens": "women's", "oclock": "o'clock"}


class EmojiDataError(ValueError):
    """A problem the user can fix: no npm client, a failed fetch, a tarball that fails its integrity check."""


# ---------------------------------------------------------------------------
# Tarballs: integrity, fetching, reading
# ---------------------------------------------------------------------------

def sri_sha512(path: str | Path) -> str:
    """Subresource Integrity string of a file: ``"sha512-" + base64(SHA-512)`` (what npm records)."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def _manual_help(vendors: Iterable[str]) -> str:
    specs = " ".join(SOURCES[v].spec for v in vendors)
    tb = " ".join(f"--tarball {SOURCES[v].tarball_name}" for v in vendors)
    return (f"run `npm pack {specs}` on a machine that has npm, copy the .tgz file(s) here and pass them with "
            f"`sumie data emoji OUT_DIR {tb}` (or build(..., tarballs=[...]))")


def _package_json(path: Path) -> dict:
    """``package/package.json`` of an npm tarball, or {} if it cannot be read (used only for error messages)."""
    try:
        with tarfile.open(path, "r:gz") as tf:
            f = tf.extractfile("package/package.json")
            return json.loads(f.read()) if f is not None else {}
    except Exception:  # tarfile, gzip and JSON errors alike: the message falls back to the hash
        return {}


def identify_tarball(path: str | Path) -> str:
    """The vendor whose pinned integrity this file matches; EmojiDataError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise EmojiDataError(f"tarball {str(path)!r} does not exist")
    sri = sri_sha512(path)
    for vendor, src in SOURCES.items():
        if sri == src.integrity:
            return vendor
    pkg = _package_json(path)
    what = f"it is {pkg.get('name')}@{pkg.get('version')}, " if pkg.get("name") else ""
    pinned = "; ".join(f"{s.spec}: {s.integrity}" for s in SOURCES.values())
    raise EmojiDataError(f"tarball {str(path)!r} fails the integrity check ({what}sha512 {sri}); "
                         f"expected one of the pinned packages ({pinned}). Re-download it with "
                         f"`npm pack {' '.join(s.spec for s in SOURCES.values())}`")


def default_cache_dir() -> Path:
    """Where fetched tarballs are kept: ``$XDG_CACHE_HOME/sumie/npm`` (default ``~/.cache/sumie/npm``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sumie" / "npm"


def fetch_tarballs(vendors: Sequence[str], cache_dir: str | Path | None = None) -> dict[str, Path]:
    """``npm pack`` the pinned packages into the cache (re-using verified copies); vendor -> tarball."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out: dict[str, Path] = {}
    need = []
    for v in vendors:
        cached = cache / SOURCES[v].tarball_name
        if cached.is_file() and sri_sha512(cached) == SOURCES[v].integrity:
            out[v] = cached
        else:
            need.append(v)
    if not need:
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiDataError(f"the npm client is not installed, so {', '.join(SOURCES[v].spec for v in need)} "
                             f"cannot be fetched; {_manual_help(need)}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        cmd = [npm, "pack", *(SOURCES[v].spec for v in need), "--pack-destination", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EmojiDataError(f"`{' '.join(cmd[1:])}` failed ({e}); {_manual_help(need)}") from e
        if proc.returncode != 0:
            said = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "npm warn" not in ln]
            tail = " | ".join(said[:3])  # npm puts the error code and reason first, log locations last
            raise EmojiDataError(f"`npm pack` exited with status {proc.returncode} ({tail}); {_manual_help(need)}")
        for v in need:
            got = Path(tmp) / SOURCES[v].tarball_name
            if not got.is_file():
                raise EmojiDataError(f"`npm pack` did not write {got.name}; {_manual_help([v])}")
            if sri_sha512(got) != SOURCES[v].integrity:
                raise EmojiDataError(f"{got.name} from npm fails the integrity check (sha512 {sri_sha512(got)}, "
                                     f"pinned {SOURCES[v].integrity}); {_manual_help([v])}")
            os.replace(got, cache / got.name)
            out[v] = cache / got.name
    return out


def resolve_tarballs(vendors: Sequence[str], tarballs: Sequence[str | Path] | None = None,
                     cache_dir: str | Path | None = None, fetch: bool = True) -> dict[str, Path]:
    """Verified tarball per vendor: the user's files first (each must match a pinned package), then npm."""
    unknown = [v for v in vendors if v not in SOURCES]
    if unknown or not vendors:
        raise EmojiDataError(f"unknown vendor(s) {unknown or list(vendors)}; valid: {', '.join(VENDORS)}")
    given: dict[str, Path] = {}
    for t in tarballs or ():
        given[identify_tarball(t)] = Path(t)
    missing = [v for v in vendors if v not in given]
    if missing and not fetch:
        raise EmojiDataError(f"no tarball for {', '.join(SOURCES[v].spec for v in missing)}; {_manual_help(missing)}")
    if missing:
        given.update(fetch_tarballs(missing, cache_dir))
    return {v: given[v] for v in vendors}


def read_package(path: str | Path, vendor: str) -> tuple[list[dict], dict[str, bytes]]:
    """One pass over a vendor tarball: (``emoji.json`` entries, {image file name: 64 px PNG bytes})."""
    prefix = f"package/img/{vendor}/{SOURCE_SIZE}/"
    entries, images = None, {}
    with tarfile.open(path, "r:gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            if m.name == "package/emoji.json":
                entries = json.load(tf.extractfile(m))
            elif m.name.startswith(prefix) and m.name.endswith(".png") and "/" not in m.name[len(prefix):]:
                images[m.name[len(prefix):]] = tf.extractfile(m).read()
    if entries is None:
        raise EmojiDataError(f"{path} has no package/emoji.json; is it an emoji-datasource-{vendor} tarball?")
    return entries, images


def _package_license(path: Path) -> str:
    with tarfile.open(path, "r:gz") as tf:
        f = tf.extractfile("package/LICENSE")
        return f.read().decode("utf-8").strip() if f is not None else ""


# ---------------------------------------------------------------------------
# Names, captions, held-out split
# ---------------------------------------------------------------------------

def _ascii(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _join(parts: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def emoji_name(entry: dict) -> str:
    """Caption name of an ``emoji.json`` entry: 'red apple', 'flag of japan', 'family with man, woman and boy'."""
    if entry.get("unified") in _NAME_OVERRIDES:
        return _NAME_OVERRIDES[entry["unified"]]
    name = _ascii(entry.get("name") or (entry.get("short_name") or "").replace("_", " ")).lower().strip()
    name = name.replace(" & ", " and ")
    if entry.get("subcategory") in UNHOLDABLE_SUBCATEGORIES and name.endswith(" flag"):
        name = "flag of " + name[: -len(" flag")]
    if (entry.get("subcategory") or "").startswith("hand") and name.endswith(" sign"):  # 'waving hand sign'
        name = name[: -len(" sign")]
    if ": " in name:  # "family: man, woman, boy", "man: red hair", "kiss: woman, man"
        head, rest = name.split(": ", 1)
        parts = [p.strip() for p in rest.split(",")]
        if parts == ["bald"]:
            name = f"bald {head}"
        elif head == "couple with heart":
            name = f"{_join(parts)} {head}"
        else:
            name = f"{head} {'of' if head == 'kiss' else 'with'} {_join(parts)}"
    return " ".join(_WORD_FIXES.get(w, w) for w in name.split())


def category_words(category: str) -> str:
    """'Food & Drink' -> 'food and drink'."""
    return category.replace("&", "and").lower()


def skin_tone_words(key: str | None) -> str | None:
    """Skin-variation key -> words: '1F3FD' -> 'medium skin tone', '1F3FB-1F3FF' -> 'light and dark skin tones'."""
    if not key:
        return None
    tones = list(dict.fromkeys(SKIN_TONES[k] for k in key.upper().split("-")))  # '1F3FB-1F3FB' -> one tone
    return f"{_join(tones)} skin tone{'s' if len(tones) > 1 else ''}"


def emoji_caption(name: str, category: str, vendor: str, skin_tone: str | None = None) -> str:
    """'red apple, food and drink, twemoji style' (skin tone, if any, after the name)."""
    parts = [name] + ([skin_tone] if skin_tone else []) + [category_words(category), SOURCES[vendor].style]
    return ", ".join(parts)


def is_heldout(name: str, subcategory: str | None = None) -> bool:
    """Held out for evaluation: one of ``HELDOUT_ALWAYS``, or SHA-256(salt/name) below ``HELDOUT_FRACTION``."""
    if subcategory in UNHOLDABLE_SUBCATEGORIES:
        return False
    if name in HELDOUT_ALWAYS:
        return True
    h = int.from_bytes(hashlib.sha256(f"{HELDOUT_SALT}/{name}".encode()).digest()[:8], "big")
    return h < HELDOUT_FRACTION * 2**64


@dataclass(frozen=True)
class EmojiItem:
    """One image to write: an emoji (or one skin-tone variant of it) of one vendor."""

    vendor: str
    image: str  # file name in the package, e.g. '1f44b-1f3fd.png'
    unified: str
    name: str
    category: str
    subcategory: str
    skin_tone: str | None
    sort_order: int

    @property
    def caption(self) -> str:
        return emoji_caption(self.name, self.category, self.vendor, self.skin_tone)

    @property
    def split(self) -> str:
        return "heldout" if is_heldout(self.name, self.subcategory) else "train"


def emoji_items(entries: Sequence[dict], vendor: str, include_skin_tones: bool = False,
                include_flags: bool = True) -> list[EmojiItem]:
    """The images a vendor's ``emoji.json`` lists, in ``sort_order``; variants follow their base emoji."""
    has = f"has_img_{vendor}"
    items = []
    for e in sorted(entries, key=lambda e: e.get("sort_order", 0)):
        if e.get("category") in SKIPPED_CATEGORIES or (not include_flags and e.get("category") == "Flags"):
            continue
        name, cat, sub = emoji_name(e), e.get("category", ""), e.get("subcategory", "")
        if e.get(has, True):
            items.append(EmojiItem(vendor, e["image"], e["unified"], name, cat, sub, None, e.get("sort_order", 0)))
        if include_skin_tones:
            for key, var in sorted((e.get("skin_variations") or {}).items()):
                if var.get(has, True):
                    items.append(EmojiItem(vendor, var["image"], var["unified"], name, cat, sub,
                                           skin_tone_words(key), e.get("sort_order", 0)))
    return items


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------

def composite_on_white(png: bytes, size: int = SOURCE_SIZE) -> Image.Image:
    """Decode a PNG, alpha-composite it onto white, resize (Lanczos) to ``size``; RGB."""
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        rgba = im.convert("RGBA")
    out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out.alpha_composite(rgba)
    out = out.convert("RGB")  # composite before resizing: straight alpha must not be filtered
    if out.size != (size, size):
        out = out.resize((size, size), Image.LANCZOS)
    return out


@dataclass
class EmojiBuildReport:
    """What :func:`build` wrote."""

    out_dir: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # vendor -> split -> images
    corrupt: list[str] = field(default_factory=list)  # 'vendor/image.png' that failed to decode
    missing: list[str] = field(default_factory=list)  # listed in emoji.json but not in the tarball
    heldout_names: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def summary(self) -> str:
        per = "; ".join(f"{v}: {c.get('train', 0)} train + {c.get('heldout', 0)} heldout"
                        for v, c in self.counts.items())
        extra = "".join(f", {len(x)} {what} skipped" for x, what in ((self.corrupt, "corrupt"),
                                                                     (self.missing, "missing")) if x)
        return f"{self.total} images in {self.out_dir} ({per}{extra}) in {self.seconds:.1f}s"


def _licenses_md(sources: Sequence[EmojiSource], metadata_license: str) -> str:
    lines = ["# Licenses and attribution", "",
             "The images in this folder are derived from third-party emoji artwork: each was composited "
             "onto a white background (and resized, if the build asked for a size other than 64 px). "
             "The artwork keeps its own licence; sumie's licence does not apply to it.", ""]
    for s in sources:
        lines += [f"## {s.artwork}: images/{s.vendor}/", "",
                  f"- Artwork: {s.artwork}, {s.copyright}. Source: {s.source_url}",
                  f"- Licence: {s.license}, {s.license_url}",
                  f"- Obtained from the npm package {s.spec} (integrity {s.integrity}).",
                  "- Changes: composited onto white, converted to RGB, possibly resized."]
        if s.vendor == "twitter":
            lines.append("- Attribution (CC-BY-4.0): \"Twemoji graphics by Twitter, Inc and other contributors, "
                         "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); "
                         "changed: composited onto white.\" Keep this notice with any copy of these images.")
        if s.vendor == "google":
            lines.append("- If you redistribute these images, include a copy of the Apache License 2.0 and this "
                         "notice of changes.")
        lines.append("")
    lines += ["## Names and categories", "",
              "From `emoji.json` of iamcal/emoji-data (https://github.com/iamcal/emoji-data), MIT licence:", "",
              "```", metadata_license, "```", "",
              "Some names are replaced by Unicode CLDR short names (https://cldr.unicode.org/, Unicode License v3, "
              "https://www.unicode.org/license.txt), Copyright Unicode, Inc.", ""]
    return "\n".join(lines)


def _readme_md(report: EmojiBuildReport, options: dict) -> str:
    rows = "\n".join(f"| {v} | {SOURCES[v].artwork} | {c.get('train', 0)} | {c.get('heldout', 0)} |"
                     for v, c in report.counts.items())
    return f"""# Emoji images (built by `sumie data emoji`)

{report.total} images of {options['size']}x{options['size']} px (RGB, emoji artwork composited onto white), with
captions in `metadata.jsonl` (Hugging Face imagefolder layout; read it with
`sumie.data.folder.ImageFolderDataset(root, resolution, split="train")`).

| vendor | artwork | train | heldout |
| --- | --- | --- | --- |
{rows}

- Caption: `<name>[, <skin tone>], <category>, <style>`, e.g. `red apple, food and drink, twemoji style`.
- Split: names in `heldout.txt` (about {HELDOUT_FRACTION:.0%} of non-flag names by a hash of the name, plus
  {', '.join(HELDOUT_ALWAYS)}) are held out of training in every vendor and skin tone.
- Options: {json.dumps(options)}.
- Do not train with horizontal flips: arrows, text and flags change meaning when mirrored.
- Licences and attribution: `LICENSES.md` (Noto Emoji: Apache-2.0; Twemoji: CC-BY-4.0).
"""


def build(out_dir: str | Path, vendors: Sequence[str] = VENDORS, tarballs: Sequence[str | Path] | None = None,
          size: int = SOURCE_SIZE, include_skin_tones: bool = False, include_flags: bool = True,
          cache_dir: str | Path | None = None, fetch: bool = True, overwrite: bool = False) -> EmojiBuildReport:
    """Build the emoji image folder at ``out_dir``, atomically (a sibling temp folder renamed at the end)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if not 8 <= size <= SOURCE_SIZE:
        raise EmojiDataError(f"size must be in [8, {SOURCE_SIZE}] (the packages hold {SOURCE_SIZE} px images), "
                             f"got {size}")
    if out.exists() and not overwrite:
        raise EmojiDataError(f"{out} already exists; remove it or pass overwrite=True (--overwrite)")
    vendors = tuple(dict.fromkeys(vendors))
    paths = resolve_tarballs(vendors, tarballs, cache_dir, fetch)  # every tarball verified before any write
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    report = EmojiBuildReport(out)
    try:
        rows, heldout, metadata_license = [], set(), ""
        for v in vendors:
            entries, images = read_package(paths[v], v)
            metadata_license = metadata_license or _package_license(paths[v])
            counts = report.counts.setdefault(v, {"train": 0, "heldout": 0})
            (tmp / "images" / v).mkdir(parents=True)
            for item in emoji_items(entries, v, include_skin_tones, include_flags):
                png = images.get(item.image)
                if png is None:
                    report.missing.append(f"{v}/{item.image}")
                    continue
                try:
                    img = composite_on_white(png, size)
                except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
                    report.corrupt.append(f"{v}/{item.image}")
                    continue
                file_name = f"images/{v}/{item.image}"
                img.save(tmp / file_name)
                split = item.split
                counts[split] += 1
                if split == "heldout":
                    heldout.add(item.name)
                rows.append({"file_name": file_name, "text": item.caption, "name": item.name,
                             "category": item.category, "subcategory": item.subcategory, "vendor": v,
                             "unified": item.unified, "skin_tone": item.skin_tone, "split": split})
        if not rows:
            raise EmojiDataError("no images were written (every image was missing or corrupt)")
        report.heldout_names = sorted(heldout)
        options = {"vendors": list(vendors), "size": size, "include_skin_tones": include_skin_tones,
                   "include_flags": include_flags}
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
        (tmp / "heldout.txt").write_text("".join(n + "\n" for n in report.heldout_names), encoding="utf-8")
        (tmp / "LICENSES.md").write_text(_licenses_md([SOURCES[v] for v in vendors], metadata_license),
                                         encoding="utf-8")
        report.seconds = time.perf_counter() - t0
        (tmp / "README.md").write_text(_readme_md(report, options), encoding="utf-8")
        manifest = {"recipe": "sumie data emoji", "options": options, "counts": report.counts,
                    "packages": {v: {"spec": SOURCES[v].spec, "integrity": SOURCES[v].integrity} for v in vendors},
                    "corrupt": report.corrupt, "missing": report.missing}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # overwrite: swap, then delete the old folder
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    return report
