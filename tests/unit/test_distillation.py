"""Knowledge distillation's parts: the loss, the teacher references, the params."""

import numpy as np
import pytest

from graft.base.errors import GraftError
from graft.config.params import DistillParams, ParamsError, parse, parse_reference


def test_distillation_loss_by_its_definition():
    import torch
    import torch.nn.functional as F

    from graft.training.fine_tune import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 2, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    # alpha 0: the labels' cross-entropy alone (with the run's label smoothing)
    assert distillation_loss(s, t, y, 4.0, 0.0, 0.1).item() == pytest.approx(F.cross_entropy(s, y, label_smoothing=0.1).item())
    # alpha 1: T^2 * KL(teacher || student) at T, the ensemble averaged as probabilities
    T = 3.0
    p = ((t[:, 0] / T).softmax(1) + (t[:, 1] / T).softmax(1)) / 2
    q = (s / T).softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert distillation_loss(s, t, y, T, 1.0).item() == pytest.approx(T * T * kl.item(), rel=1e-5)
    # a student that matches its single teacher has nothing left to learn from it
    assert distillation_loss(s, s[:, None], y, T, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_moves_the_student_toward_the_teacher():
    """One gradient step on the soft term alone lowers the KL to the teacher."""
    import torch

    from graft.training.fine_tune import distillation_loss

    torch.manual_seed(0)
    student = torch.nn.Linear(6, 4)
    x, teacher = torch.randn(32, 6), torch.randn(32, 1, 4) * 3
    y = torch.zeros(32, dtype=torch.long)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    before = distillation_loss(student(x), teacher, y, 2.0, 1.0)
    for _ in range(50):
        opt.zero_grad()
        distillation_loss(student(x), teacher, y, 2.0, 1.0).backward()
        opt.step()
    assert distillation_loss(student(x), teacher, y, 2.0, 1.0).item() < 0.8 * before.item()


def test_teacher_references(tmp_path):
    assert parse_reference("champion", "m") == ("m", "alias", "champion")
    assert parse_reference("other@prod", "m") == ("other", "alias", "prod")
    assert parse_reference("other/3", "m") == ("other", "version", "3")
    assert parse_reference("7", "m") == ("m", "version", "7")
    (tmp_path / "teacher").mkdir()
    assert parse_reference(str(tmp_path / "teacher"), "m") == tmp_path / "teacher"
    with pytest.raises(GraftError, match="no such model directory"):
        parse_reference(str(tmp_path / "absent"), "m")
    with pytest.raises(GraftError, match="neither a model directory nor a registry reference"):
        parse_reference("a b c", "m")


def test_distill_params():
    assert parse(DistillParams, {"teacher": None, "temperature": 4.0, "alpha": 0.7}, "distill").references == []
    ensemble = parse(DistillParams, {"teacher": ["champion", "m/2"], "temperature": 2, "alpha": 0.5}, "distill")
    assert list(ensemble.references) == ["champion", "m/2"]
    for bad, key in (({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"), ({"teacher": []}, "empty list")):
        with pytest.raises((GraftError, ParamsError), match=key):
            parse(DistillParams, {"teacher": "champion", "temperature": 4.0, "alpha": 0.7, **bad}, "distill")
    with pytest.raises((GraftError, ParamsError), match="distill"):
        parse(DistillParams, {"teacher": "champion", "temprature": 4.0}, "distill")


def test_class_order_maps_the_teachers_classes_onto_the_data():
    from types import SimpleNamespace

    from graft.training.teacher import class_order

    teacher = SimpleNamespace(reference="t", cfg=SimpleNamespace(modality="image", classes=["b", "c", "a"]))
    order = class_order(teacher, ["a", "b", "c"], "image")
    assert list(np.array(["b", "c", "a"])[order]) == ["a", "b", "c"]
    with pytest.raises(GraftError, match="is an image model; this data is text"):
        class_order(teacher, ["a", "b", "c"], "text")
    with pytest.raises(GraftError, match=r"does not know \['d'\]"):
        class_order(teacher, ["a", "b", "c", "d"], "image")
