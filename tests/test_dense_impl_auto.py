"""`--dense-impl auto` (cpu_blas.faster_impl): MKL only where it measured faster, measured once per host."""

import json

import pytest

from bixse_jax.models import compute_policy
from bixse_jax.models import cpu_blas


@pytest.fixture
def host(monkeypatch, tmp_path):
    """MKL 'available', a fake measurement that counts its calls, the cache in tmp_path."""
    monkeypatch.setenv("BIXSE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_blas, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu_blas, "available", lambda: True)
    calls = []

    def set_timings(xla_s, mkl_s):
        def fake(hidden):
            calls.append(hidden)
            return {"xla_s": xla_s, "mkl_s": mkl_s}
        monkeypatch.setattr(cpu_blas, "measure", fake)
        return calls
    return set_timings


def test_auto_picks_xla_where_its_dots_are_faster(host, tmp_path):
    calls = host(xla_s=0.041, mkl_s=0.056)  # e.g. an AMD EPYC, where MKL dispatches slow kernels
    assert compute_policy.resolve_dense_impl("auto", "float32", None) == "xla"
    assert len(calls) == 1
    (written,) = (tmp_path / "dense_impl").glob("*.json")
    record = json.loads(written.read_text())
    assert record["choice"] == "xla" and record["xla_s"] == 0.041 and record["mkl_s"] == 0.056
    assert record["key"]["cpu"] == cpu_blas.cpu_model()
    # Cached: later runs reuse the measurement.
    assert compute_policy.resolve_dense_impl("auto", "float32", None) == "xla"
    assert cpu_blas.faster_impl()["why"].startswith("measured earlier")
    assert len(calls) == 1


def test_auto_picks_mkl_where_it_is_faster(host):
    calls = host(xla_s=0.080, mkl_s=0.050)
    assert compute_policy.resolve_dense_impl("auto", "float32", None) == "mkl"
    assert compute_policy.resolve_dense_impl("auto", "float32", None) == "mkl"
    assert len(calls) == 1
    assert compute_policy.resolve_dense_impl("auto", "bfloat16", None) == "xla"  # MKL multiplies float32 only
    assert compute_policy.resolve_dense_impl("xla", "float32", None) == "xla"  # an explicit choice is not measured
    assert len(calls) == 1


def test_cache_is_per_host(host, monkeypatch):
    calls = host(xla_s=0.080, mkl_s=0.050)
    assert cpu_blas.faster_impl()["choice"] == "mkl"
    monkeypatch.setattr(cpu_blas, "cpu_model", lambda: "AMD EPYC 7B13")
    host(xla_s=0.041, mkl_s=0.056)
    assert cpu_blas.faster_impl()["choice"] == "xla"  # another CPU model: measured again
    assert cpu_blas.faster_impl()["choice"] == "xla"
    assert len(calls) == 2


def test_unavailable_mkl_is_xla_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("BIXSE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_blas, "unavailable_reason", lambda: "Intel MKL (libmkl_rt) was not found")
    monkeypatch.setattr(cpu_blas, "available", lambda: False)
    monkeypatch.setattr(cpu_blas, "measure", lambda hidden: pytest.fail("measured without MKL"))
    assert compute_policy.resolve_dense_impl("auto", "float32", None) == "xla"
    assert cpu_blas.faster_impl()["choice"] == "xla"
    assert not (tmp_path / "dense_impl").exists()


@pytest.mark.parametrize("vendor, expected", [("GenuineIntel", "mkl"), ("AuthenticAMD", "xla")])
def test_failed_measurement_falls_back_to_the_vendor(host, monkeypatch, vendor, expected):
    host(0, 0)
    monkeypatch.setattr(cpu_blas, "measure", lambda hidden: (_ for _ in ()).throw(RuntimeError("no")))
    monkeypatch.setattr(cpu_blas, "cpu_vendor", lambda: vendor)
    assert cpu_blas.faster_impl()["choice"] == expected
