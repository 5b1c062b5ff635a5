import pytest

from sumie import config as C


def test_presets_and_unknown_preset():
    cfg = C.preset("shapes-32")
    assert cfg.data.resolution == 32 and cfg.model.num_classes is not None
    with pytest.raises(ValueError, match="valid: emoji-64, emoji-64-pixel, shapes-32, shapes-text-32, tiny, tiny-latent, tiny-text"):
        C.preset("huge")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'lr_rate' in \[train\]; valid keys: .*batch_size"):
        C.merge(C.preset("tiny"), {"train": {"lr_rate": 1}})
    with pytest.raises(ValueError, match="valid sections"):
        C.merge(C.preset("tiny"), {"trainer": {}})
    with pytest.raises(ValueError, match="valid keys"):
        C.from_dict({"model": {"chanels": 3}})


def test_toml_yaml_files_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nmax_steps = 7\nlr = 1\n[model]\nchannel_mult = [1, 2]\n')
    cfg = C.resolve("tiny", toml, ["train.batch_size=3", "sample.sampler=euler"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mult == (1, 2) and cfg.train.batch_size == 3 and cfg.sample.sampler == "euler"
    yml = tmp_path / "run.yaml"
    yml.write_text("data:\n  resolution: 24\n")
    assert C.resolve("tiny", yml).data.resolution == 24
    with pytest.raises(ValueError, match="section.key=value"):
        C.parse_override("max_steps=3")
    with pytest.raises(TypeError, match="expected int"):
        C.resolve("tiny", None, ['train.max_steps="many"'])


def test_round_trip_through_dict():
    cfg = C.preset("shapes-32")
    assert C.from_dict(cfg.to_dict()) == cfg


def test_changing_the_level_count_of_a_resolved_config():
    cfg = C.merge(C.preset("shapes-32"), {"model": {"channel_mult": [1, 2]}})  # was 3 levels
    assert cfg.model.num_res_blocks == (1, 1) and cfg.model.transformer_depth == (1, 1)
    with pytest.raises(ValueError, match="one entry per channel_mult level"):
        C.merge(C.preset("shapes-32"), {"model": {"channel_mult": [1, 2], "num_res_blocks": [1, 2, 3]}})
