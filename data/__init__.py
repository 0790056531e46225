"""teachercache.bundled: the demo teacher (teacher/) and corpus (corpus/) shipped with the package (README.md)."""
