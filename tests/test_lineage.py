"""A model's name and versions: the version a file holds, whatever its name says."""

from __future__ import annotations

from conftest import SMALL, make_surfaces

from fastpadim.lineage import file_version, model_name, model_version, versioned_path, versions
from fastpadim.model import Padim


def test_versions_are_the_ones_the_files_hold(tmp_path):
    model = Padim(**SMALL).fit(make_surfaces(6, seed=3))
    first = tmp_path / "bottle.padim"
    model.save(first)
    assert model_name(tmp_path / "bottle.v3.padim") == "bottle" and file_version(first) == model_version(model) == 1
    assert versions(first) == {1: first}

    model.partial_fit(make_surfaces(2, seed=4))  # an update written in place: bottle.padim now holds version 2
    model.save(first)
    assert versions(first) == {2: first}
    model.partial_fit(make_surfaces(2, seed=5))
    third = versioned_path(first, model_version(model))
    model.save(third)
    (tmp_path / "bottle.v4.padim").write_bytes(b"\0" * 100)  # not a model: listed by its name, loading says why
    (tmp_path / "cap.padim").write_bytes(first.read_bytes())  # another model's name
    assert versions(third) == {2: first, 3: third, 4: tmp_path / "bottle.v4.padim"}
