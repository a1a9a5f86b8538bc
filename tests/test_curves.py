"""The per-epoch record of a training run and its plot."""

from __future__ import annotations

from hetvit.curves import format_epoch, plot_epochs, read_epochs


def test_lines_round_trip_and_a_redone_epoch_keeps_its_last_line(tmp_path):
    log = tmp_path / "epochs.log"
    lines = [format_epoch(1, 16, 700.4, 390, {"train/loss_epoch": 1.9, "val/top1": 0.4}),
             format_epoch(2, 16, 690, 780, {"train/loss_epoch": 1.7, "val/top1": 0.48}),
             "some other output a nohup log might hold",
             format_epoch(2, 24, 701, 780, {"train/loss_epoch": 1.6, "val/top1": 0.5}),
             format_epoch(3, 24, 699, 1170, {"train/loss_epoch": 1.5, "val/top1": 0.55})]
    log.write_text("\n".join(lines) + "\n")
    rows = read_epochs(log)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"epoch": 1, "total": 16, "time": 700.0, "step": 390.0,
                       "train/loss_epoch": 1.9, "val/top1": 0.4}
    assert rows[1]["total"] == 24 and rows[1]["val/top1"] == 0.5  # the resumed run's line
    png = plot_epochs(log, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    noted = plot_epochs(log, tmp_path / "noted.png", notes=[(2, "eval crop changed")])
    assert noted.read_bytes() != png.read_bytes()  # the note is drawn


def test_training_appends_one_line_per_epoch_across_a_resume(tmp_path):
    from hetvit.trainer import fit

    from .test_training import config, module, write_colours

    write_colours(tmp_path / "data", per_class=4)
    fit(module(), config(tmp_path, "run", epochs=1, val_data=tmp_path / "data"))
    fit(module(), config(tmp_path, "run", epochs=2, val_data=tmp_path / "data", resume=True))
    rows = read_epochs(tmp_path / "run" / "epochs.log")
    assert [(r["epoch"], r["total"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(0 <= r["val/top1"] <= 1 for r in rows)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
