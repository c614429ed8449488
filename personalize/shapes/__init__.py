"""The built-in `shapes` model: a procedural world (`world`), its pretraining (`pretrain`), the
pretrained pipeline (`model`) and a judge that names what an image shows (`judge`)."""
