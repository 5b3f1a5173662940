"""Zarr arrays, Zarr groups and OME-Zarr (0.1 to 0.5, bioformats2raw layouts), read lazily.

A plain array is read the way numpy code writes it ((Z, Y, X), (C, Z, Y, X), ...); an
OME-Zarr image gives its axes, its pyramid and its voxel size in micrometres.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .raw import (
    UM_PER_UNIT,
    RawVolume,
    VolumeError,
    check_not_empty,
    dask_from_zarr,
    probe_chunks,
    short_detail,
)


def looks_like_zarr(path: Path) -> bool:
    """True when the folder ``path`` holds Zarr metadata (.zarray, .zgroup or zarr.json)."""
    return any((path / f).exists() for f in (".zarray", ".zgroup", "zarr.json"))


def read_zarr(path: Path) -> RawVolume:
    """The image in a Zarr folder: an array, a group with one array, or an OME-Zarr image
    (every pyramid level); raises VolumeError saying what is wrong and what to do."""
    import zarr

    name = path.name
    if not path.is_dir():
        raise VolumeError(
            f"'{name}' is a file, but a Zarr store is a folder. Choose the .zarr folder "
            "itself (not a file inside it).",
            path,
        )
    if not looks_like_zarr(path):
        raise VolumeError(
            f"'{name}' is not a Zarr store: it has no .zarray, .zgroup or zarr.json. "
            "Choose the top folder of the Zarr / OME-Zarr data set.",
            path,
        )
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise VolumeError(
            f"'{name}' could not be opened as Zarr ({short_detail(exc)}). Check that the folder "
            "was copied completely.",
            path,
        ) from None
    with zarr_errors(path):
        return _zarr_raw(node, path)


@contextlib.contextmanager
def zarr_errors(path: Path) -> Iterator[None]:
    """Turn anything but a VolumeError raised inside the block into the VolumeError for
    unreadable Zarr metadata or data."""
    try:
        yield
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(
            f"'{path.name}' has unreadable Zarr / OME-Zarr metadata or data ({short_detail(exc)}). "
            "Check that the folder was copied completely, or write it again.",
            path,
        ) from None


def _zarr_raw(node, path: Path) -> RawVolume:
    import zarr

    name = path.name
    if isinstance(node, zarr.Array):
        attrs = dict(node.attrs)
        levels = [dask_from_zarr(node)]
        # a plain array has no axis names: read it the way numpy code writes it
        named = {2: "YX", 3: "ZYX", 4: "CZYX", 5: "TCZYX"}
        axes = named.get(node.ndim, "Q" * (node.ndim - 2) + "YX")
        sizes = {}
        vs = attrs.get("voxel_size")  # a plain array may carry (z, y, x) um itself
        if isinstance(vs, list | tuple) and len(vs) == 3:
            sizes = dict(zip("ZYX", map(float, vs), strict=True))
        metadata = {"format": "zarr", "source_axes": axes, "source_shape": node.shape,
                    "dtype": str(node.dtype)}
        check_not_empty(path, node.shape)
        probe_chunks(path, levels[0])
        return RawVolume(levels, axes, sizes, "zarr-attrs" if sizes else None, metadata)

    group = node
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)  # OME-Zarr 0.5 nests its keys under "ome"
    if "multiscales" not in ome and "bioformats2raw.layout" in ome and "0" in group:
        group = group["0"]  # bioformats2raw: the first image lives in the group "0"
        attrs = dict(group.attrs)
        ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        arrays = [k for k, _ in group.arrays()]
        if len(arrays) == 1:
            return _zarr_raw(group[arrays[0]], path)
        raise VolumeError(
            f"'{name}' is a Zarr group without OME-Zarr 'multiscales' metadata and with "
            f"{len(arrays)} arrays ({', '.join(arrays[:5]) or 'none'}), so it is unclear "
            "which one is the image. Open the array folder inside it directly.",
            path,
        )
    ms = ome["multiscales"][0]
    version = str(ms.get("version", ome.get("version", "")))
    datasets = ms["datasets"]
    first = group[datasets[0]["path"]]
    ndim = first.ndim
    axes_meta = ms.get("axes")
    if axes_meta is None:  # OME-Zarr 0.1 / 0.2: always 5D tczyx
        axes_meta = list("tczyx")[-ndim:]
    axes_meta = [{"name": a} if isinstance(a, str) else a for a in axes_meta]
    axes = "".join(_ome_axis_letter(a) for a in axes_meta)
    if len(axes) != ndim:
        raise VolumeError(
            f"'{name}' lists {len(axes)} axes in its OME-Zarr metadata but the image has "
            f"{ndim} dimensions. Write the OME-Zarr again with a current tool.",
            path,
        )
    check_not_empty(path, first.shape)
    levels = [dask_from_zarr(group[d["path"]]) for d in datasets]
    probe_chunks(path, levels[0])

    scale = _ome_zarr_scale(datasets[0], ms, ndim)
    sizes: dict[str, float] = {}
    source = None
    if scale is not None:
        units = [a.get("unit") for a in axes_meta]
        unknown = []
        for letter, s, unit in zip(axes, scale, units, strict=True):
            if letter not in "ZYX":
                continue
            # an unknown unit ("parsec") gives no voxel size, as in a TIFF: never guess um
            factor = UM_PER_UNIT.get(str(unit).strip().lower()) if unit else 1.0
            if factor is None:
                unknown.append(str(unit))
                continue
            sizes[letter] = float(s) * factor
        spatial_units = [u for a, u in zip(axes, units, strict=True) if a in "ZYX"]
        unitless_ones = not any(spatial_units) and all(
            sizes.get(k) == 1.0 for k in "ZYX"
        )
        if unitless_ones:
            sizes = {}  # a bare scale of 1 says nothing about micrometres
        elif not unknown:
            source = "ome-zarr"
        else:
            sizes = {}

    metadata: dict[str, Any] = {
        "format": "ome-zarr",
        "ome_zarr_version": version,
        "source_axes": axes,
        "source_shape": tuple(first.shape),
        "dtype": str(first.dtype),
    }
    if scale is not None and unknown:
        metadata["unknown_units"] = sorted(set(unknown))
    if "image-label" in ome:
        metadata["kind"] = "labels"
    omero = ome.get("omero") or {}
    names = [c.get("label", "") for c in omero.get("channels", []) if isinstance(c, dict)]
    if any(names):
        metadata["channel_names"] = names
    return RawVolume(levels, axes, sizes, source, metadata)


def _ome_axis_letter(axis: dict) -> str:
    name = str(axis.get("name", "")).lower()
    kind = str(axis.get("type", "")).lower()
    if name in ("t", "c", "z", "y", "x"):
        return name.upper()
    if kind == "time":
        return "T"
    if kind == "channel":
        return "C"
    return "Q"


def _ome_zarr_scale(dataset: dict, ms: dict, ndim: int) -> list[float] | None:
    scale = None
    for transforms in (dataset.get("coordinateTransformations"),
                       ms.get("coordinateTransformations")):
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
                s = [float(v) for v in t["scale"]]
                scale = s if scale is None else [a * b for a, b in zip(scale, s, strict=True)]
    return scale

