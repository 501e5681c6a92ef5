import pytest

from rlhf.registry import Registry, UnknownNameError


def test_unknown_name_lists_valid_names_and_suggests():
    reg = Registry("thing")
    reg.register("alpha", needs_values=True)(lambda: 1)
    reg.register("beta")(lambda: 2)
    with pytest.raises(UnknownNameError,
                       match=r"unknown thing 'alpah' \(did you mean 'alpha'\?\); valid names: alpha, beta"):
        reg.get("alpah")
    assert reg.names() == ["alpha", "beta"]
    assert reg.meta("alpha") == {"needs_values": True}
    assert reg.get("beta")() == 2


def test_duplicate_registration_fails():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
