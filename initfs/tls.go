package initfs

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
)

// The host's CA files in the runtime share, and where they are installed (spec 4.5).
const (
	TLSCAPath      = "/.msb/tls/ca.pem"
	TLSHostCAsPath = "/.msb/tls/host-cas.pem"
)

var (
	caTrustDirs   = []string{"/usr/local/share/ca-certificates", "/etc/pki/ca-trust/source/anchors"}
	caBundlePaths = []string{"/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"}
)

// InstallTLS installs the host's CA (and host CAs) into the guest's trust stores under root
// ("/" as PID 1) and returns the environment variables that point TLS clients at them, for exec
// children. Unlike the reference, a CA already in the bundle is not appended again on every boot.
func InstallTLS(root string, log *slog.Logger) ([]string, error) {
	var env []string
	for _, src := range []struct {
		path, name string
		setEnv     bool
	}{{TLSCAPath, "microsandbox-ca", true}, {TLSHostCAsPath, "microsandbox-host-cas", false}} {
		pem, err := os.ReadFile(filepath.Join(root, src.path))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("tls: read %s: %w", src.path, err)
		}
		for _, dir := range caTrustDirs {
			for _, ext := range []string{".pem", ".crt"} {
				if err := copyTrust(filepath.Join(root, dir), src.name+ext, pem); err != nil {
					log.Warn("tls: copy to trust dir failed", "dir", dir, "error", err)
				}
			}
		}
		bundle, err := appendBundle(root, pem)
		if err != nil {
			return nil, err
		}
		if src.setEnv {
			env = append(env, "SSL_CERT_FILE="+bundle, "REQUESTS_CA_BUNDLE="+bundle, "CURL_CA_BUNDLE="+bundle,
				"NODE_EXTRA_CA_CERTS="+TLSCAPath)
		}
		log.Info("tls: CA installed", "source", src.path, "bundle", bundle)
	}
	return env, nil
}

// copyTrust writes name into dir, creating missing directories with mode 0755.
func copyTrust(dir, name string, pem []byte) error {
	if err := mkdirAll0755(dir); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name), pem, 0o644)
}

func mkdirAll0755(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := mkdirAll0755(filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return os.Chmod(dir, 0o755) // whatever the umask
}

// appendBundle adds pem to the first existing system bundle (or creates the Debian one) and
// returns the bundle's path as seen in the guest.
func appendBundle(root string, pem []byte) (string, error) {
	target := caBundlePaths[0]
	for _, p := range caBundlePaths {
		if _, err := os.Stat(filepath.Join(root, p)); err == nil {
			target = p
			break
		}
	}
	full := filepath.Join(root, target)
	old, err := os.ReadFile(full)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("tls: read bundle %s: %w", target, err)
	}
	if bytes.Contains(old, bytes.TrimSpace(pem)) {
		return target, nil // installed on an earlier boot
	}
	if err := mkdirAll0755(filepath.Dir(full)); err != nil {
		return "", fmt.Errorf("tls: bundle dir: %w", err)
	}
	f, err := os.OpenFile(full, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return "", fmt.Errorf("tls: open bundle %s: %w", target, err)
	}
	defer f.Close()
	if len(old) > 0 && old[len(old)-1] != '\n' {
		if _, err := f.Write([]byte{'\n'}); err != nil {
			return "", fmt.Errorf("tls: append to %s: %w", target, err)
		}
	}
	if _, err := f.Write(pem); err != nil {
		return "", fmt.Errorf("tls: append to %s: %w", target, err)
	}
	return target, nil
}
