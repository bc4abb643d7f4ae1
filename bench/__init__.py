"""
The Artifact Vault benchmark suite: ``python -m bench.run`` (see bench/README.rst).

Every figure is a ratio to a reference measured on the same machine in the
same run: nginx serving the same file, Twisted's own ``static.File``, or a
direct download from the same upstream.
"""
