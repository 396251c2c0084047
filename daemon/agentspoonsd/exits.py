"""The process's exit statuses, in one place: sysexits(3), by the names `os` gives them.

Every command of `agentspoonsd` (the daemon, `check-config`, `token`, `simulate`, `watch`,
`probe`) returns one of these; `cli` lists them in each command's help. The systemd unit's
``RestartPreventExitStatus=78`` relies on EX_CONFIG meaning "the config is wrong: restarting
will not help".
"""

from __future__ import annotations

import os
import signal

EX_OK = os.EX_OK  # 0: done; the daemon: stopped by SIGTERM or SIGINT
EX_USAGE = os.EX_USAGE  # 64: a bad argument (e.g. not a ws:// or wss:// URL)
EX_UNAVAILABLE = os.EX_UNAVAILABLE  # 69: the daemon could not be reached or refused the upgrade
EX_SOFTWARE = os.EX_SOFTWARE  # 70: a service exhausted its crash budget
EX_OSERR = os.EX_OSERR  # 71: a listener could not be bound
EX_CANTCREAT = os.EX_CANTCREAT  # 73: the history or the tokens file cannot be written
EX_TEMPFAIL = os.EX_TEMPFAIL  # 75: nothing arrived in time
EX_NOPERM = os.EX_NOPERM  # 77: the token was refused
EX_CONFIG = os.EX_CONFIG  # 78: the configuration is invalid; nothing was started or changed
# 141 (128 + SIGPIPE), as a shell reports a command killed by it: stdout's reader went away
# (`| head -1`); the command stops quietly instead.
EX_PIPE = 128 + signal.SIGPIPE
