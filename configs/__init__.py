"""The YAML configs, shipped inside the package as ``dqt_lightning.configs`` so that tools find them in any install."""
