"""
Twisted's ``static.File`` without an access log: the small-file reference.

    python -m bench.static_nolog DIR PORT

A ``Site`` over ``static.File(DIR)`` on 127.0.0.1:PORT whose ``log`` does
nothing, run by the default reactor (epoll), as ``twistd web --path DIR``
would run it, minus the access log line it writes for every request.
"""

import sys

from twisted.internet import reactor
from twisted.web.server import Site
from twisted.web.static import File


class NoLogSite(Site):
    def log(self, request):
        pass


def main(argv=None):
    folder, port = (argv or sys.argv[1:])[:2]
    reactor.listenTCP(int(port), NoLogSite(File(folder)), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
