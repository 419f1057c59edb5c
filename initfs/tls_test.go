package initfs

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestInstallTLS(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	root := t.TempDir()
	ca := "-----BEGIN CERTIFICATE-----\nMSBCA\n-----END CERTIFICATE-----\n"
	hostCAs := "-----BEGIN CERTIFICATE-----\nHOSTCA\n-----END CERTIFICATE-----\n"
	os.MkdirAll(filepath.Join(root, ".msb/tls"), 0o755)
	os.WriteFile(filepath.Join(root, TLSCAPath), []byte(ca), 0o644)
	os.WriteFile(filepath.Join(root, TLSHostCAsPath), []byte(hostCAs), 0o644)
	// An existing bundle without a trailing newline: a newline goes in first.
	os.MkdirAll(filepath.Join(root, "etc/pki/tls/certs"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/pki/tls/certs/ca-bundle.crt"), []byte("EXISTING"), 0o644)

	env, err := InstallTLS(root, quiet)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"SSL_CERT_FILE=/etc/pki/tls/certs/ca-bundle.crt", "REQUESTS_CA_BUNDLE=/etc/pki/tls/certs/ca-bundle.crt",
		"CURL_CA_BUNDLE=/etc/pki/tls/certs/ca-bundle.crt", "NODE_EXTRA_CA_CERTS=/.msb/tls/ca.pem"}
	if !reflect.DeepEqual(env, want) {
		t.Fatalf("env %q", env)
	}
	bundle, _ := os.ReadFile(filepath.Join(root, "etc/pki/tls/certs/ca-bundle.crt"))
	if string(bundle) != "EXISTING\n"+ca+hostCAs {
		t.Fatalf("bundle %q", bundle)
	}
	for _, dir := range caTrustDirs {
		for _, name := range []string{"microsandbox-ca.pem", "microsandbox-ca.crt", "microsandbox-host-cas.pem", "microsandbox-host-cas.crt"} {
			if _, err := os.Stat(filepath.Join(root, dir, name)); err != nil {
				t.Fatal(err)
			}
		}
		if st, _ := os.Stat(filepath.Join(root, dir)); st.Mode().Perm() != 0o755 {
			t.Fatalf("%s mode %v", dir, st.Mode())
		}
	}
	// A second boot appends nothing.
	if _, err := InstallTLS(root, quiet); err != nil {
		t.Fatal(err)
	}
	again, _ := os.ReadFile(filepath.Join(root, "etc/pki/tls/certs/ca-bundle.crt"))
	if string(again) != string(bundle) {
		t.Fatalf("second boot changed the bundle: %q", again)
	}
}

func TestInstallTLSCreatesBundle(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, ".msb/tls"), 0o755)
	os.WriteFile(filepath.Join(root, TLSCAPath), []byte("CA\n"), 0o644)
	env, err := InstallTLS(root, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil || !strings.HasPrefix(env[0], "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt") {
		t.Fatalf("%q %v", env, err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/ssl/certs/ca-certificates.crt")); string(b) != "CA\n" {
		t.Fatalf("bundle %q", b)
	}
	// No CA files at all: nothing to do.
	if env, err := InstallTLS(t.TempDir(), slog.New(slog.NewTextHandler(io.Discard, nil))); env != nil || err != nil {
		t.Fatalf("%q %v", env, err)
	}
}
