"""One split of a Hugging Face data set (``data.hf_name``), for plain text and conversations alike.

``data.hf_name`` is a data set on the Hub (read through ``datasets``' cache: offline, a data set
already cached loads, others are refused by name), a local folder of data files (JSON lines, CSV,
Parquet or text, as ``datasets.load_dataset`` reads a folder), or a folder written by
``save_to_disk`` (read with ``load_from_disk``). ``data.hf_config`` picks a configuration and
``data.hf_split`` the split; a split the data set does not have is refused naming that key.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.core.errors import UserError, require


def saved_to_disk(path: Path) -> bool:
    """Whether ``path`` is a folder ``save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def load_split(data_cfg, needs: str):
    """The ``datasets.Dataset`` of ``data.hf_split``; ``needs``: what reads it (for the message
    when ``datasets`` is missing)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{needs} needs the 'datasets' package: pip install datasets", "data.hf_name") from None
    name, split = str(data_cfg.hf_name), str(data_cfg.hf_split)
    if saved_to_disk(Path(name)):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            require(split in loaded, f"{name} has the splits {sorted(loaded)}, not {split!r}", "data.hf_split")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(name, data_cfg.hf_config, split=split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise UserError(f"{name}: {error}", "data.hf_split") from None
        raise
    except (ConnectionError, FileNotFoundError) as error:
        raise UserError(f"could not load {name!r} ({type(error).__name__}: {str(error)[:200]}); without a network, "
                        "give a local folder of data files or one written by save_to_disk", "data.hf_name") from None


def column(dataset, key: str, config_key: str) -> None:
    """Refuse a data set without the column ``key``, naming ``config_key``."""
    require(key in dataset.column_names, f"the data set has the columns {dataset.column_names}, not {key!r}",
            config_key)
