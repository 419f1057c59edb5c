#!/usr/bin/env bash
# Writes docs/first-run.md: a first session with agentd as a new user sees it. make vm; a shell
# with -it (under a real terminal); a tree copied in and out with -r; a forward into the guest
# under a deny-by-default policy; a denied request and the audit line that explains it; a
# policy reload; shutdown. Every command shown is run, and its output is what it printed, so
# the transcript stays true: run this again after a change (e2e/TestFirstRun runs it too).
#
#   scripts/first-run.sh [OUT]     # default docs/first-run.md
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/first-run.md}
work=$(mktemp -d)
# This run's own context file and VM directories: a reader's own make vm is left alone.
export XDG_CONFIG_HOME=$work/config AGENTD_VM_RUNS=$work/runs AGENTCTL_CONNECT=
doc=$work/doc.md
vm= web=
cleanup() {
	[ -z "$web" ] || kill "$web" 2>/dev/null || true
	[ -z "$vm" ] || kill -TERM -- "-$vm" 2>/dev/null || true # make vm's group, if it is still up
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

say() { printf '%s\n' "$@" >>"$doc"; }
fence() { say '```'"${1:-}"; }
# cmd [!] COMMAND: "$ COMMAND" and what it printed, as in a terminal. A failure stops the
# script, unless ! says the command is expected to fail.
cmd() {
	local fail=0 rc=0
	[ "$1" = "!" ] && { fail=1; shift; }
	say "\$ $1"
	bash -c "$1" >>"$doc" 2>&1 || rc=$?
	if [ $rc != 0 ] && [ $fail = 0 ]; then echo "first-run: '$1' failed ($rc):" >&2; tail -20 "$doc" >&2; exit 1; fi
	if [ $rc = 0 ] && [ $fail = 1 ]; then echo "first-run: '$1' should have failed" >&2; exit 1; fi
	return 0
}
# until_output FILE TEXT: wait (up to 3 minutes) until a background command printed TEXT.
until_output() {
	for _ in $(seq 3600); do grep -qF -- "$2" "$1" && return 0; sleep 0.05; done
	echo "first-run: no '$2' in $1:" >&2; tail -20 "$1" >&2; exit 1
}
# terminal COMMAND LINE...: COMMAND under a terminal (a pty, 24x100), typing each LINE at the
# shell prompt; prints the screen's text.
terminal() {
	python3 - "$@" <<'PY'
import fcntl, os, pty, re, select, struct, sys, termios, time
argv, lines = sys.argv[1].split(), sys.argv[2:]
pid, fd = pty.fork()
if pid == 0:
    os.environ["TERM"] = "xterm"
    os.execvp(argv[0], argv)
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
buf, pos = b"", 0
def until(pat, limit=30):
    """Reads until pat appears after pos (True), or to EOF (False)."""
    global buf, pos
    end = time.time() + limit
    while True:
        i = buf.find(pat, pos)
        if i >= 0:
            pos = i + len(pat)
            return True
        r, _, _ = select.select([fd], [], [], max(0, end - time.time()))
        if not r:
            sys.exit("no %r from %s within %ds; got %r" % (pat, argv, limit, buf))
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side of the pty is gone
            return False
        if not chunk:
            return False
        buf += chunk
for line in lines:
    until(b"# ")  # the shell's prompt
    os.write(fd, line.encode() + b"\n")
until(b"# ")
os.write(fd, b"exit\n")
until(b"\0")  # to EOF: agentctl exits with the shell
_, status = os.waitpid(pid, 0)
# The screen's text: terminal control sequences (ash asks where the cursor is) are dropped.
text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r", b"", buf)
sys.stdout.write(text.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
PY
}

say "# A first run" "" \
	"What a new user sees on a Debian machine (x86_64, root for the set-up), from a fresh clone." \
	"Written by \`scripts/first-run.sh\`, which runs every command shown: timings, addresses and" \
	"ids differ from run to run." ""

say "## make vm" "" "In one terminal:" ""
setsid make vm >"$work/vm.out" 2>&1 </dev/null &
vm=$!
until_output "$work/vm.out" "agentd is PID 1"
fence console
say '$ make vm'
grep -v '^CGO_ENABLED=0 go build' "$work/vm.out" >>"$doc"
fence
say "" "It runs until Ctrl-C. In another terminal, agentctl finds the VM by itself (make vm set" \
	"its context):" ""

fence console
cmd "build/agentctl context"
fence
say "" "## A shell, as with docker exec -it" ""
fence console
say '$ build/agentctl exec -it -- sh'
terminal "build/agentctl exec -it -- sh" "uname -r" "stty size" "id" "ls /" >>"$doc"
fence
say "" "Without -i the program's stdin is at EOF; without a terminal, -t is dropped with a note" \
	"rather than echoing the input back; the exit status is the program's, 128+N for signal N:" ""
fence console
cmd "echo 'piped in' | build/agentctl exec -it -- cat"
cmd ! "build/agentctl exec -- sh -c 'kill -TERM \$\$'"
say "\$ echo \$?" "143"
cmd ! "build/agentctl exec -w /nonexistent -- ls"
fence

say "" "## A tree in and out, as with cp -r" ""
mkdir -p "$work/project/src"
echo 'print("hello")' >"$work/project/src/main.py"
echo '# project' >"$work/project/README.md"
ln -s src/main.py "$work/project/main"
fence console
cmd "cd $work && find project | sort"
cmd "build/agentctl fs put -r $work/project /root/project"
cmd "build/agentctl fs ls /root/project"
cmd "build/agentctl exec -w /root/project -- cat src/main.py"
cmd "build/agentctl fs get -r /root/project $work/back && diff -r $work/project $work/back && echo same"
cmd ! "build/agentctl fs get /root/nothing-here $work/x"
fence

say "" "## A forward under a deny-by-default policy" "" \
	"examples/deny-by-default.yaml allows a few names over HTTPS, and ingress: a connection from" \
	"the host into the guest itself is decided as ingress, so forwards keep working." ""
fence console
cmd "build/agentctl policy reload examples/deny-by-default.yaml"
cmd "build/agentctl exec -- sh -c 'mkdir -p /www && echo hello from the guest > /www/index.html && httpd -p 127.0.0.1:8080 -h /www'"
say '$ build/agentctl forward 8080 &'
build/agentctl forward 8080 >"$work/fwd.out" 2>&1 &
fwd=$!
until_output "$work/fwd.out" "forwarding"
cat "$work/fwd.out" >>"$doc"
cmd "curl -sS http://127.0.0.1:8080/"
kill $fwd
say '$ kill %1'
fence

say "" "## A denied request, and the audit line that explains it" "" \
	"A web server on this host (10.0.2.2 is the host's loopback as the guest sees it) that the" \
	"policy does not allow:" ""
mkdir -p "$work/www" && echo "hello from the host" >"$work/www/index.html"
fence console
say '$ python3 -m http.server -b 127.0.0.1 -d www 8000 &'
python3 -m http.server -b 127.0.0.1 -d "$work/www" 8000 >/dev/null 2>&1 &
web=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:8000/ && break; sleep 0.05; done
# (The reload is asynchronous to its signal: make sure the policy is in force first.)
for _ in $(seq 100); do build/agentctl exec -- wget -q -O /dev/null http://10.0.2.2:8000/ 2>/dev/null || break; sleep 0.1; done
cmd ! "build/agentctl exec -- wget -q -O - http://10.0.2.2:8000/"
cmd "build/agentctl policy explain examples/deny-by-default.yaml tcp 10.0.2.2 8000"
say '$ make vm-audit'
setsid make vm-audit >"$work/audit.out" 2>&1 </dev/null &
audit=$!
until_output "$work/audit.out" '"dst":"10.0.2.2:8000","rule":"default","verdict":"deny"'
kill -TERM -- "-$audit" 2>/dev/null || true
wait $audit 2>/dev/null || true
grep -v '^make: \*\*\*' "$work/audit.out" >>"$doc"
say '^C'
fence

say "" "## A policy reload" "" "Back to the policy make vm started with; the same request goes through:" ""
fence console
cmd "build/agentctl policy reload examples/make-vm.yaml"
for _ in $(seq 100); do build/agentctl exec -- wget -q -O /dev/null http://10.0.2.2:8000/ 2>/dev/null && break; sleep 0.1; done
cmd "build/agentctl exec -- wget -q -O - http://10.0.2.2:8000/"
fence

say "" "## Shutdown" "" "agentctl shutdown (or Ctrl-C in the make vm terminal) powers the VM off:" ""
fence console
cmd "build/agentctl shutdown"
fence
for _ in $(seq 600); do kill -0 "$vm" 2>/dev/null || break; sleep 0.05; done
if kill -0 "$vm" 2>/dev/null; then echo "first-run: make vm still running after shutdown" >&2; exit 1; fi
vm=
say "" "and make vm's terminal ends with:" ""
fence console
tail -3 "$work/vm.out" >>"$doc"
fence
# The run's own temporary directory reads better as a placeholder.
sed -i "s|$work|/tmp/first-run|g" "$doc"
mkdir -p "$(dirname "$out")"
mv "$doc" "$out"
echo "first-run: wrote $out" >&2
