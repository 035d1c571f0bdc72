"""
finetune.py through train_cifar.py --init-from: small official-layout release files (our models' state_dicts, which
carry the official key names, saved bare as the releases are) and train_cifar.py checkpoints start new runs with a
changed class count, a --class-map, a changed image size; mismatches are refused in one line; the new run resumes.
"""
import hashlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

import dit
import train_cifar
import uvit
from devices import Processes
from conftest import TINY, one_line_error, randomized

CPU = torch.device("cpu")

UVIT_TINY = ["--backbone", "uvit", "--model", "U-ViT-Tiny", "--model-arg", "hidden_size=32", "--model-arg", "depth=2",
             "--model-arg", "num_heads=2", "--model-arg", "patch_size=4", "--model-arg", "conv=False",
             "--batch-size", "4", "--log-every", "1", "--keep-every", "0", "--sample-every", "0"]


def release(tmp_path, model, name):
    """model's weights (randomized: nothing zero-initialised) saved as a bare state_dict, as the releases are."""
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in randomized(model).state_dict().items()}
    path = tmp_path / name
    torch.save(sd, path)
    return sd, str(path)


def dit_release(tmp_path, classes=12, size=32, learn_sigma=True):
    model = dit.DiT(input_size=size, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                    num_classes=classes, class_dropout_prob=0.1, learn_sigma=learn_sigma)
    return release(tmp_path, model, "DiT-tiny-release.pt")


def setup(argv, cifar_dir, tmp_path, base=TINY):
    args = train_cifar.parse_args(base + ["--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / "run"), *argv],
                                  gpu=False)
    return train_cifar.setup(args, Processes(), CPU)[0]


def test_class_count_change_keeps_null_row_and_draws_new_rows(cifar_dir, tmp_path):
    sd, path = dit_release(tmp_path, classes=12)
    run = setup(["--class-cond", "--init-from", path], cifar_dir, tmp_path)
    new = run.model.state_dict()
    table = new["y_embedder.embedding_table.weight"]
    assert table.shape == (11, 32)  # 10 CIFAR classes + the null row
    assert torch.equal(table[10], sd["y_embedder.embedding_table.weight"][12])  # the null row moves over
    assert 0.01 < table[:10].std() < 0.03  # new rows: DiT's N(0, 0.02)
    assert not any(torch.equal(table[i], sd["y_embedder.embedding_table.weight"][i]) for i in range(10))
    for k in new:
        if k != "y_embedder.embedding_table.weight":
            assert torch.equal(new[k], sd[k]), k
    assert all(torch.equal(a, b) for a, b in zip(run.ema.state_dict().values(), new.values()))
    assert run.step == 0 and run.config["init_from"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_class_map_keeps_chosen_rows_in_order(cifar_dir, tmp_path):
    sd, path = dit_release(tmp_path, classes=12)
    rows = [3, 7, 0, 1, 2, 4, 5, 6, 8, 11]
    run = setup(["--class-cond", "--init-from", path, "--class-map", ",".join(map(str, rows))], cifar_dir, tmp_path)
    old, table = sd["y_embedder.embedding_table.weight"], run.model.y_embedder.embedding_table.weight
    assert torch.equal(table[:10], old[rows]) and torch.equal(table[10], old[12])
    assert run.config["init_from"]["class_map"] == rows


def test_same_class_count_keeps_the_table(cifar_dir, tmp_path):
    sd, path = dit_release(tmp_path, classes=10)
    run = setup(["--class-cond", "--init-from", path], cifar_dir, tmp_path)
    assert torch.equal(run.model.y_embedder.embedding_table.weight, sd["y_embedder.embedding_table.weight"])


def test_dit_image_size_change_recomputes_sincos(cifar_dir, tmp_path):
    sd, path = dit_release(tmp_path, size=64)  # a 16 x 16 patch grid; CIFAR's is 8 x 8
    run = setup(["--class-cond", "--init-from", path], cifar_dir, tmp_path)
    new = run.model.state_dict()
    assert torch.allclose(new["pos_embed"][0], dit.get_2d_sincos_pos_embed(32, 8).float())
    assert torch.equal(new["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])


def test_uvit_image_size_change_interpolates_positions(cifar_dir, tmp_path):
    model = uvit.UViT(input_size=64, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                      num_classes=10, class_dropout_prob=0.1, conv=False)
    sd, path = release(tmp_path, model, "uvit-release.pth")
    run = setup(["--class-cond", "--init-from", path], cifar_dir, tmp_path, base=UVIT_TINY)
    pos, old = run.model.pos_embed.detach(), sd["pos_embed"]
    assert pos.shape == (1, 2 + 64, 32)
    assert torch.equal(pos[:, :2], old[:, :2])  # label and time tokens kept
    grid = F.interpolate(old[:, 2:].reshape(1, 16, 16, 32).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                         align_corners=False)
    assert torch.allclose(pos[:, 2:], grid.permute(0, 2, 3, 1).reshape(1, 64, 32))
    assert torch.equal(run.model.label_emb.weight, sd["label_emb.weight"])


def test_our_checkpoint_starts_a_conditional_run(cifar_dir, tmp_path, baseline):
    ckpt = torch.load(baseline / "latest.pt", weights_only=True)  # unconditional, 20 steps
    run = setup(["--class-cond", "--init-from", str(baseline / "latest.pt")], cifar_dir, tmp_path)
    new = run.model.state_dict()
    assert run.step == 0 and run.config["init_from"]["kind"] == "checkpoint"
    for k, v in ckpt["ema"].items():
        assert torch.equal(new[k], v), k
    assert new["y_embedder.embedding_table.weight"].shape == (11, 32)


@pytest.mark.parametrize("extra, release_kw, expect", [
    (["--no-learn-sigma"], {}, "add --learn-sigma"),
    ([], {"learn_sigma": False}, "add --no-learn-sigma"),
    (["--formulation", "edm"], {}, "add --formulation ddpm"),
    (["--prediction", "v"], {}, "add --prediction eps"),
    (["--class-map", "1,2"], {}, "--class-map lists 2 classes but the data have 10"),
    (["--class-map", "0,1,2,3,4,5,6,7,8,12"], {}, "class 12 is not among the 12 classes"),
    (["--model-arg", "depth=3"], {}, "lacks blocks.2"),
])
def test_mismatches_are_one_line(cifar_dir, tmp_path, capsys, extra, release_kw, expect):
    _, path = dit_release(tmp_path, **release_kw)
    argv = TINY + ["--class-cond", "--steps", "1", "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / "r"),
                   "--init-from", path, *extra]
    with pytest.raises(SystemExit) as e:
        train_cifar.main(argv)
    assert expect in one_line_error(e, capsys)
    assert not os.path.exists(tmp_path / "r" / "latest.pt")


def test_other_backbone_is_refused(cifar_dir, tmp_path, capsys):
    _, path = dit_release(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_cifar.main(UVIT_TINY + ["--steps", "1", "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / "r"),
                                      "--init-from", path])
    assert "--backbone dit" in one_line_error(e, capsys)


def test_new_run_resumes_and_keeps_its_record(cifar_dir, tmp_path, capsys):
    _, path = dit_release(tmp_path)
    out = tmp_path / "r"
    argv = TINY + ["--class-cond", "--data-dir", str(cifar_dir), "--out-dir", str(out), "--init-from", path]
    train_cifar.main(argv + ["--steps", "2"])
    first = torch.load(out / "latest.pt", weights_only=True)
    record = first["init_from"]
    assert record["path"] == os.path.abspath(path) and len(record["sha256"]) == 64 and first["step"] == 2
    assert json.loads((out / "config.json").read_text())["init_from"] == record
    capsys.readouterr()
    train_cifar.main(argv + ["--steps", "3"])  # the same command: a resume, not a second start
    assert "resumed from" in capsys.readouterr().out
    train_cifar.main(argv[:-2] + ["--steps", "4"])  # without --init-from too
    last = torch.load(out / "latest.pt", weights_only=True)
    assert last["step"] == 4 and last["init_from"] == record


def test_init_from_into_a_scratch_run_is_refused(cifar_dir, tmp_path, capsys, existing):
    _, path = dit_release(tmp_path, classes=10)
    with pytest.raises(SystemExit) as e:
        train_cifar.main(TINY + ["--steps", "30", "--data-dir", str(cifar_dir), "--out-dir", str(existing),
                                 "--init-from", path])
    assert "pick a new --out-dir" in one_line_error(e, capsys)


def test_diffit_release_with_new_classes(cifar_dir, tmp_path, capsys):
    import diffit
    model = diffit.LatentDiffiT(input_size=32, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                                num_classes=12, class_dropout_prob=0.1, learn_sigma=True)
    sd, path = release(tmp_path, model, "diffit-release.pt")
    base = ["--backbone", "diffit", "--model", "DiffiT-XL/2", "--model-arg", "hidden_size=32", "--model-arg",
            "depth=2", "--model-arg", "num_heads=2", "--model-arg", "patch_size=4", "--formulation", "ddpm",
            "--learn-sigma", "--batch-size", "4", "--sample-every", "0"]
    run = setup(["--class-cond", "--init-from", path, "--class-map", "0,1,2,3,4,5,6,7,8,9"], cifar_dir, tmp_path,
                base=base)
    new = run.model.state_dict()
    assert torch.equal(new["y_embedder.embedding_table.weight"][:10], sd["y_embedder.embedding_table.weight"][:10])
    assert torch.equal(new["blocks.0.attn.qkv_temb.weight"], sd["blocks.0.attn.qkv_temb.weight"])
    model = diffit.LatentDiffiT(input_size=64, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                                num_classes=12, class_dropout_prob=0.1, learn_sigma=True)
    _, path = release(tmp_path, model, "diffit-64.pt")  # another grid: its relative position tables do not fit
    with pytest.raises(SystemExit) as e:
        train_cifar.main(base + ["--class-cond", "--steps", "1", "--data-dir", str(cifar_dir), "--out-dir",
                                 str(tmp_path / "r"), "--init-from", path])
    assert "fit its 64 x 64 inputs only" in one_line_error(e, capsys)


def test_genvit_official_training_file(cifar_dir, tmp_path):
    from conftest import genvit_official_state_dict
    import genvit
    path = tmp_path / "genvit_cifar.pth"
    official = genvit_official_state_dict()
    torch.save({"model_state_dict": official, "epoch": 500}, path)
    ours = genvit.convert_official(official)
    run = setup(["--init-from", str(path)], cifar_dir, tmp_path,
                base=["--backbone", "genvit", "--model", "GenViT-CIFAR", "--batch-size", "4", "--sample-every", "0"])
    new = run.model.state_dict()
    for k, v in ours.items():
        if k in new:
            assert torch.equal(new[k], v.to(new[k].dtype)), k
    assert new["cls_head.weight"].shape == (10, 384)  # no head in the file: the classifier starts from its init
