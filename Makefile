# agentd: build, test, benchmark, fuzz.
GO      ?= go
BUILD   ?= build
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
FUZZTIME ?= 5s
# Go's own install location, for machines where it is not on PATH (as in CI).
export PATH := $(PATH):/usr/local/go/bin
# Every fuzz target: package and name.
FUZZ_TARGETS := \
	./protocol:FuzzFrameEnvelope \
	./protocol:FuzzCorePayload \
	./protocol:FuzzExecPayload \
	./protocol:FuzzFsPayload \
	./protocol:FuzzTCPPayload \
	./protocol:FuzzBootstrap \
	./protocol:FuzzBulkRecord \
	./initfs:FuzzLoadConfig \
	./initfs:FuzzBootstrapConfig \
	./initfs:FuzzParseModuleList \
	./egress/policy:FuzzParse \
	./egress/resolver:FuzzAnswer \
	./netstack:FuzzClientHelloSNI \
	./netstack/tunlink:FuzzInbound \
	./tlshello:FuzzParse

.PHONY: all build test unit fuzz-smoke fuzz diff-ref bench bench-egress bench-streams bench-vm lint run initramfs vm vm-audit setup-vm setup-test clean

all: build

build:
	@echo "go build: $(BUILD)/agentd, $(BUILD)/agentctl"
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BUILD)/agentd ./cmd/agentd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BUILD)/agentctl ./cmd/agentctl

# The full suite, as CI runs it: the set-up check, lint, a short run of every fuzzer, then the
# race-enabled tests.
test: setup-test lint fuzz-smoke unit

# What make vm and make test need: checked, and installed with apt as root (scripts/setup.sh).
setup-vm:
	@scripts/setup.sh vm

setup-test:
	@scripts/setup.sh test

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

# A short run of every fuzzer. A real crasher is saved under testdata/fuzz (and then fails the
# plain tests too); a failure that saved nothing is the fuzzing engine's own hiccup under load
# with short runs, so that gets one retry. Output is shown whenever a run fails.
fuzz-smoke:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name ($(FUZZTIME))"; \
		for try in 1 2; do \
			if $(GO) test $$pkg -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) >/tmp/fuzz-$$name.log 2>&1; then \
				if grep -q "no fuzz tests to fuzz" /tmp/fuzz-$$name.log; then echo "no fuzz target $$name in $$pkg"; exit 1; fi; \
				break; \
			fi; \
			tail -20 /tmp/fuzz-$$name.log; \
			if [ -n "$$(git status --porcelain -- $$pkg/testdata/fuzz/$$name 2>/dev/null)" ] || [ $$try = 2 ]; then exit 1; fi; \
			echo "fuzz $$name: engine failure without a crasher; retrying once"; \
		done; \
	done

# A long fuzzing session of the frame+envelope decoder: make fuzz FUZZTIME=10m
fuzz:
	$(GO) test ./protocol -run '^$$' -fuzz '^FuzzFrameEnvelope$$' -fuzztime $(FUZZTIME)

# The differential test against the model of the reference agent (internal/testkit/refmodel), longer
# than in make test: make diff-ref N=5000 SEED=7 (needs root: its exec cases switch users).
N    ?= 3000
SEED ?= $(shell date +%s)
diff-ref:
	$(GO) test ./internal/testkit/refmodel -run '^TestDifferential$$' -count=1 -timeout 60m -v -args -cases $(N) -seed $(SEED) | grep -v '^=== '

# Two reports: over a pty (a slow channel, like virtio-serial: the channel is the limit) and over
# a unix socket (a fast channel: agentd is also compared with a plain-copy relay).
bench:
	$(GO) test ./bench -run TestReport -count=1 -v -args -report -channel pty -bytes 268435456
	$(GO) test ./bench -run TestReport -count=1 -v -args -report -channel socket

# iperf3 and connection rates through loopback, veth routing, a copy relay and agentd's netstack
# (offload and plain tun endpoints, guest MTU 1500 and 65520), alternating in one run; proxy
# CPU-s/GB and memory. EGRESS_ARGS passes more (e.g. -rounds 5 -iperf-seconds 10 -systems relay,offload-1500).
bench-egress:
	$(GO) test ./bench -run TestEgressReport -count=1 -v -timeout 60m -args -egress $(EGRESS_ARGS)

bench-streams:
	$(GO) test ./bench -run TestStreamsReport -count=1 -v -args -streams

# Boot the microVM 5 times on each machine: boot-to-ready, agentd's init_time_ns, artifact sizes.
bench-vm:
	$(GO) test ./bench -run TestBootReport -count=1 -v -args -report -boots 5

lint:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# build/initramfs.cpio.gz (agentd as /init, busybox, kernel modules) and build/vmlinuz.
initramfs: build
	@scripts/mkinitramfs.sh $(BUILD)

# Boot a microVM with agentd as PID 1 and serve its channel (see README); vm-audit follows the
# egress audit of the newest one.
vm: setup-vm initramfs
	@scripts/run-vm.sh

vm-audit:
	@scripts/run-vm.sh audit

# Run the agent and a relay on this machine, with a forward through them (see README).
run: build
	scripts/run-local.sh

clean:
	rm -rf $(BUILD)
