"""bench.py OUT.json -- bench eviction args...; candidate names from cands.CANDS are added to POLICIES."""
import sys, io, contextlib
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.abspath(__file__)))
from cands import CANDS, install
install()
from lmdeploy_hostcache.tier import eviction
for k, f in CANDS.items():
    if k not in eviction.POLICIES:
        eviction.POLICIES[k] = f
from lmdeploy_hostcache import cli
out = sys.argv[1]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main(['bench', 'eviction', '--no-progress', '--json', *sys.argv[2:]])
open(out, 'w').write(buf.getvalue())
print('rc', rc, file=sys.stderr)
