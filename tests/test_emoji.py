import dataclasses
import io
import json
import os
import stat
import tarfile

import numpy as np
import pytest
from PIL import Image

from sumie.data import emoji
from sumie.data.emoji import (EmojiDataError, build, emoji_caption, emoji_name, is_heldout, sri_sha512,
                              skin_tone_words)
from sumie.data.folder import ImageFolderDataset, _read_metadata

TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")


def _entry(name, unified, category, subcategory, order, skin=False, two_person=False, short="x"):
    e = {"name": name, "unified": unified, "image": unified.lower() + ".png", "short_name": short,
         "category": category, "subcategory": subcategory, "sort_order": order,
         "has_img_google": True, "has_img_twitter": True}
    if skin:
        keys = [f"{a}-{b}" for a in TONES for b in TONES] if two_person else list(TONES)
        e["skin_variations"] = {k: {"unified": f"{unified}-{k}", "image": f"{unified}-{k}.png".lower(),
                                    "has_img_google": True, "has_img_twitter": True} for k in keys}
    return e


ENTRIES = [
    _entry("RED APPLE", "1F34E", "Food & Drink", "food-fruit", 3),
    _entry("HEAVY BLACK HEART", "2764-FE0F", "Smileys & Emotion", "heart", 1),
    _entry("WAVING HAND SIGN", "1F44B", "People & Body", "hand-fingers-open", 2, skin=True),
    _entry("HANDSHAKE", "1F91D", "People & Body", "hands", 4, skin=True, two_person=True),
    _entry("Japan Flag", "1F1EF-1F1F5", "Flags", "country-flag", 5),
    _entry("Côte d’Ivoire Flag", "1F1E8-1F1EE", "Flags", "country-flag", 6),
    _entry("EMOJI MODIFIER FITZPATRICK TYPE-4", "1F3FD", "Component", "skin-tone", 7),
    _entry("BROKEN ROSE", "1F940", "Animals & Nature", "plant-flower", 8),  # its PNG is corrupt
    _entry("GHOST PEPPER", "1FAAA", "Food & Drink", "food-vegetable", 9),  # its PNG is missing
]


def _png(rgba, size=64):
    buf = io.BytesIO()
    arr = np.zeros((size, size, 4), np.uint8)
    arr[16:48, 16:48] = rgba  # an opaque square on a transparent background
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _tarball(path, vendor, entries=ENTRIES, version="16.0.0"):
    files = {"package/package.json": json.dumps({"name": f"emoji-datasource-{vendor}", "version": version}).encode(),
             "package/LICENSE": b"The MIT License (MIT)\n\nCopyright (c) 2013 Cal Henderson\n",
             "package/emoji.json": json.dumps(entries).encode()}
    colour = {"google": (200, 30, 30, 255), "twitter": (30, 30, 200, 255)}[vendor]
    for e in entries:
        for img in [e["image"]] + [v["image"] for v in (e.get("skin_variations") or {}).values()]:
            if e["name"] == "GHOST PEPPER":
                continue
            data = b"\x89PNG\r\n\x1a\nnot really a png" if e["name"] == "BROKEN ROSE" else _png(colour)
            files[f"package/img/{vendor}/64/{img}"] = data
    files[f"package/img/{vendor}/sheets/64.png"] = _png(colour)  # a sprite sheet: not an emoji
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Tiny tarballs for both vendors, pinned in SOURCES by their own integrity."""
    paths = {}
    for vendor in ("google", "twitter"):
        p = _tarball(tmp_path / f"emoji-datasource-{vendor}-16.0.0.tgz", vendor)
        monkeypatch.setitem(emoji.SOURCES, vendor, dataclasses.replace(emoji.SOURCES[vendor], integrity=sri_sha512(p)))
        paths[vendor] = p
    return paths


def _rows(out):
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_names_and_captions():
    def name(n, u="0", cat="Objects", sub="x"):
        return emoji_name({"name": n, "unified": u, "category": cat, "subcategory": sub})

    assert name("RED APPLE") == "red apple"
    assert name("HEAVY BLACK HEART", "2764-FE0F") == "red heart"  # legacy name misdescribes the picture
    assert name("Japan Flag", cat="Flags", sub="country-flag") == "flag of japan"
    assert name("Côte d’Ivoire Flag", cat="Flags", sub="country-flag") == "flag of cote d'ivoire"
    assert name("St. Kitts & Nevis Flag", cat="Flags", sub="country-flag") == "flag of st. kitts and nevis"
    assert name("PIRATE FLAG", cat="Flags", sub="flag") == "pirate flag"
    assert name("FAMILY: MAN, WOMAN, BOY") == "family with man, woman and boy"
    assert name("MAN: RED HAIR") == "man with red hair"
    assert name("WOMAN: BALD") == "bald woman"
    assert name("KISS: WOMAN, MAN") == "kiss of woman and man"
    assert name("COUPLE WITH HEART: WOMAN, WOMAN") == "woman and woman couple with heart"
    assert name("CLOCK FACE ONE OCLOCK") == "clock face one o'clock"
    assert name("WOMANS HAT") == "woman's hat"
    assert name("THUMBS UP SIGN", sub="hand-fingers-closed") == "thumbs up"
    assert name("NO ENTRY SIGN", sub="warning") == "no entry sign"
    assert emoji_name({"name": "", "short_name": "thumbs_up", "unified": "0"}) == "thumbs up"
    assert skin_tone_words(None) is None
    assert skin_tone_words("1F3FD") == "medium skin tone"
    assert skin_tone_words("1F3FB-1F3FF") == "light and dark skin tones"
    assert skin_tone_words("1F3FC-1F3FC") == "medium-light skin tone"
    assert emoji_caption("red apple", "Food & Drink", "twitter") == "red apple, food and drink, twemoji style"
    assert (emoji_caption("waving hand", "People & Body", "google", "medium skin tone")
            == "waving hand, medium skin tone, people and body, noto emoji style")


def test_heldout_split_is_a_stable_hash_of_the_name():
    # pinned: changing the salt, the fraction or the hash would silently change the evaluation set
    assert [n for n in ("rose", "snail", "airplane", "bread", "pizza", "rocket", "dog face") if is_heldout(n)] == \
        ["rose", "snail", "airplane", "bread"]
    assert all(is_heldout(n) for n in emoji.HELDOUT_ALWAYS)
    names = [f"synthetic emoji {i}" for i in range(20000)]
    frac = sum(map(is_heldout, names)) / len(names)
    assert abs(frac - emoji.HELDOUT_FRACTION) < 0.006
    assert not any(is_heldout(n, "country-flag") for n in names[:2000])  # flags: pure memorisation, never held out


def test_build_writes_captions_splits_licenses_and_skips_corrupt(fake_packages, tmp_path):
    out = tmp_path / "emoji"
    report = build(out, tarballs=list(fake_packages.values()), fetch=False)
    rows = _rows(out)
    # per vendor: apple, heart, waving hand, handshake, two flags; component skipped; rose corrupt; pepper missing
    assert report.counts == {"google": {"train": 4, "heldout": 2}, "twitter": {"train": 4, "heldout": 2}}
    assert sorted(report.corrupt) == ["google/1f940.png", "twitter/1f940.png"]
    assert sorted(report.missing) == ["google/1faaa.png", "twitter/1faaa.png"]
    texts = {r["text"] for r in rows}
    assert {"red apple, food and drink, twemoji style", "red heart, smileys and emotion, noto emoji style",
            "flag of japan, flags, twemoji style", "flag of cote d'ivoire, flags, noto emoji style"} <= texts
    assert not any("skin tone" in t or "fitzpatrick" in t for t in texts)
    by_name = {(r["name"], r["vendor"]): r for r in rows}
    assert by_name[("red apple", "google")]["split"] == "heldout"
    assert by_name[("flag of japan", "google")]["split"] == "train"
    assert (out / "heldout.txt").read_text().split("\n")[:-1] == ["red apple", "red heart"]
    for r in rows:
        with Image.open(out / r["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
            assert im.getpixel((32, 32)) == ((200, 30, 30) if r["vendor"] == "google" else (30, 30, 200))
    lic = (out / "LICENSES.md").read_text()
    assert "CC-BY" in lic and "creativecommons.org/licenses/by/4.0" in lic and "Apache License 2.0" in lic
    assert "Cal Henderson" in lic
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["packages"]["google"]["integrity"] == sri_sha512(fake_packages["google"])
    assert "red apple" in (out / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == sorted(["emoji", *(p.name for p in fake_packages.values())])

    train = ImageFolderDataset(out, 16, random_flip=False, split="train")
    held = ImageFolderDataset(out, 16, random_flip=False, split="heldout")
    assert len(train) == 8 and len(held) == 4
    assert not any("apple" in c or "red heart" in c for c in train.captions)
    assert all(c in texts for c in train.captions + held.captions)
    with pytest.raises(ValueError, match="split 'test'"):
        ImageFolderDataset(out, 16, split="test")
    captions = _read_metadata(out)  # the caption-only view that other readers use is unchanged
    assert captions[(out / rows[0]["file_name"]).resolve()] == rows[0]["text"] and len(captions) == len(rows)


def test_skin_tones_flags_vendor_and_size_options(fake_packages, tmp_path):
    out = tmp_path / "tones"
    report = build(out, vendors=("twitter",), tarballs=[fake_packages["twitter"]], include_skin_tones=True,
                   include_flags=False, size=32, fetch=False)
    rows = _rows(out)
    assert {r["vendor"] for r in rows} == {"twitter"} and report.counts.keys() == {"twitter"}
    assert not any("flag" in r["text"] for r in rows)
    assert len(rows) == 4 + 5 + 25  # apple, heart, waving hand, handshake + 5 + 25 tone variants
    texts = [r["text"] for r in rows]
    assert "waving hand, medium-dark skin tone, people and body, twemoji style" in texts
    assert "handshake, light and dark skin tones, people and body, twemoji style" in texts
    assert "handshake, dark skin tone, people and body, twemoji style" in texts
    tones = [r for r in rows if r["skin_tone"]]
    assert len(tones) == 30 and all(r["file_name"].endswith(f"{r['unified'].lower()}.png") for r in tones)
    with Image.open(out / rows[0]["file_name"]) as im:
        assert im.size == (32, 32)


def test_integrity_mismatch_is_a_clear_error_and_writes_nothing(fake_packages, tmp_path):
    bad = _tarball(tmp_path / "other.tgz", "google", entries=ENTRIES[:2], version="15.1.2")
    out = tmp_path / "emoji"
    with pytest.raises(EmojiDataError, match=r"other\.tgz.*integrity.*emoji-datasource-google@15\.1\.2.*npm pack"):
        build(out, tarballs=[fake_packages["twitter"], bad], fetch=False)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with pytest.raises(EmojiDataError, match="does not exist"):
        build(out, tarballs=[tmp_path / "nope.tgz"], fetch=False)
    with pytest.raises(EmojiDataError, match="no tarball for emoji-datasource-google@16.0.0"):
        build(out, tarballs=[fake_packages["twitter"]], fetch=False)
    with pytest.raises(EmojiDataError, match="unknown vendor"):
        build(out, vendors=("apple",), fetch=False)


def test_missing_npm_says_how_to_supply_tarballs(fake_packages, tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    out = tmp_path / "emoji"
    with pytest.raises(EmojiDataError, match=r"npm client is not installed.*npm pack emoji-datasource-google@16\.0\.0"
                                             r".*--tarball emoji-datasource-google-16\.0\.0\.tgz"):
        build(out, vendors=("google",), cache_dir=tmp_path / "cache")
    assert not out.exists()


def _fake_npm(tmp_path, body):
    script = tmp_path / "npm"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_fetch_with_npm_pack_verifies_and_caches(fake_packages, tmp_path, monkeypatch):
    src = fake_packages["google"]
    # argv: pack <spec> --pack-destination <dir>
    npm = _fake_npm(tmp_path, f'echo "$1 $2" >> {tmp_path}/calls\ncp "{src}" "$4/"\n')
    monkeypatch.setattr(emoji.shutil, "which", lambda name: npm)
    cache = tmp_path / "cache"
    build(tmp_path / "a", vendors=("google",), cache_dir=cache)
    build(tmp_path / "b", vendors=("google",), cache_dir=cache)  # served from the verified cache
    assert (tmp_path / "calls").read_text() == "pack emoji-datasource-google@16.0.0\n"
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")

    failing = _fake_npm(tmp_path, 'echo "npm error code E404" >&2\nexit 1\n')
    monkeypatch.setattr(emoji.shutil, "which", lambda name: failing)
    with pytest.raises(EmojiDataError, match=r"exited with status 1 \(npm error code E404\).*--tarball"):
        build(tmp_path / "c", vendors=("twitter",), cache_dir=cache)
    wrong = _fake_npm(tmp_path, f'cp "{src}" "$4/emoji-datasource-twitter-16.0.0.tgz"\n')
    monkeypatch.setattr(emoji.shutil, "which", lambda name: wrong)
    with pytest.raises(EmojiDataError, match="fails the integrity check"):
        build(tmp_path / "c", vendors=("twitter",), cache_dir=cache)
    assert not (tmp_path / "c").exists() and not (cache / "emoji-datasource-twitter-16.0.0.tgz").exists()


def test_failure_mid_build_leaves_nothing_and_keeps_an_existing_folder(fake_packages, tmp_path, monkeypatch):
    out = tmp_path / "emoji"
    calls = []
    real = emoji.composite_on_white

    def flaky(png, size=64):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # not an image error: must abort the build, not be counted as corrupt
        return real(png, size)

    monkeypatch.setattr(emoji, "composite_on_white", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(out, tarballs=list(fake_packages.values()), fetch=False)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    monkeypatch.setattr(emoji, "composite_on_white", real)
    build(out, vendors=("google",), tarballs=[fake_packages["google"]], fetch=False)
    with pytest.raises(EmojiDataError, match="already exists"):
        build(out, tarballs=list(fake_packages.values()), fetch=False)
    calls.clear()
    monkeypatch.setattr(emoji, "composite_on_white", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(out, tarballs=list(fake_packages.values()), fetch=False, overwrite=True)
    assert {r["vendor"] for r in _rows(out)} == {"google"}  # the old dataset is intact
    monkeypatch.setattr(emoji, "composite_on_white", real)
    build(out, tarballs=list(fake_packages.values()), fetch=False, overwrite=True)
    assert {r["vendor"] for r in _rows(out)} == {"google", "twitter"}
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_cli_data_emoji_and_shapes(fake_packages, tmp_path, capsys):
    from sumie.cli import main

    out = tmp_path / "emoji"
    assert main(["data", "emoji", str(out), "--vendors", "google", "--tarball", str(fake_packages["google"]),
                 "--no-flags", "--skin-tones"]) == 0
    msg = capsys.readouterr().out
    assert "google: 32 train + 2 heldout" in msg and "skipped 1 corrupt" in msg
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tarball")
    assert main(["data", "emoji", str(tmp_path / "x"), "--tarball", str(bad)]) == 2
    assert "integrity" in capsys.readouterr().err

    shapes = tmp_path / "shapes"
    assert main(["data", "shapes", str(shapes), "--n", "5", "--resolution", "16"]) == 0
    ds = ImageFolderDataset(shapes, 16, random_flip=False)
    from sumie.data import ShapesDataset, ShapesConfig

    ref = ShapesDataset(ShapesConfig(resolution=16))
    assert ds.captions == [ref[i]["caption"] for i in range(5)]
    assert np.allclose(ds[0]["x"].numpy(), ref[0]["x"].numpy(), atol=1e-6)
    assert main(["data", "shapes", str(shapes), "--n", "5"]) == 2


def _real_tarballs():
    dirs = [os.environ.get("SUMIE_EMOJI_TARBALLS"), emoji.default_cache_dir()]
    for d in filter(None, dirs):
        paths = [os.path.join(d, s.tarball_name) for s in emoji.SOURCES.values()]
        if all(os.path.isfile(p) for p in paths):
            return paths
    return None


@pytest.mark.skipif(_real_tarballs() is None, reason="the real emoji-datasource tarballs are not in the cache "
                                                     "(set SUMIE_EMOJI_TARBALLS to a folder holding them)")
def test_real_packages(tmp_path):
    report = build(tmp_path / "emoji", tarballs=_real_tarballs(), fetch=False, include_flags=False)
    assert not report.corrupt and not report.missing
    for v in emoji.VENDORS:
        c = report.counts[v]
        assert c["train"] + c["heldout"] == 1906 - 270 and 50 < c["heldout"] < 120
    texts = {r["text"] for r in _rows(tmp_path / "emoji")}
    assert {"red apple, food and drink, twemoji style", "red heart, smileys and emotion, noto emoji style"} <= texts
