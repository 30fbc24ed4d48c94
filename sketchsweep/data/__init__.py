"""Data: numpy_bitmap folders, the synthetic sketch generator and splits (NumPy only here);
``data.load`` (loading a run's data, placing it on the device) and ``data.views`` (the rows of a
split, batch by batch) add torch."""

from sketchsweep.data.errors import DataError
from sketchsweep.data.folder import Dataset, load_folder, stratified_split
from sketchsweep.data.synthetic import write_synthetic

__all__ = ["DataError", "Dataset", "load_folder", "stratified_split", "write_synthetic"]
