# Type stubs for ml_collections (which ships none), for basedpyright (pyrightconfig.json).
# Without them its unannotated ConfigDict.__getattr__ is inferred as the union of every value
# type __getitem__ can return, and each `config.model.x` is an error; a config's fields are
# dynamic, so here they are Any. Only the parts the project uses are declared.
from ml_collections.config_dict import ConfigDict as ConfigDict
from ml_collections.config_dict import FieldReference as FieldReference
from ml_collections.config_dict import FrozenConfigDict as FrozenConfigDict
