package initfs

import (
	"fmt"
	"path"
	"sort"
	"strings"
)

// MountKind is the kind of a user mount.
type MountKind uint8

const (
	MountKindDir MountKind = iota + 1
	MountKindFile
	MountKindDisk
	MountKindTmpfs
)

var mountKindNames = [...]string{MountKindDir: "dir", MountKindFile: "file", MountKindDisk: "disk", MountKindTmpfs: "tmpfs"}

func (k MountKind) String() string {
	if int(k) < len(mountKindNames) && k != 0 {
		return mountKindNames[k]
	}
	return "invalid"
}

// PlannedMount is one step of the mount plan: the Index-th mount of its kind's list in Config,
// at its normalised Path.
type PlannedMount struct {
	Kind  MountKind
	Index int
	Path  string
}

// MountPlanError is a user mount the plan refuses, checked before anything is mounted.
type MountPlanError struct {
	Mount PlannedMount
	Other *PlannedMount // the mount it collides with, if any
	Err   string
}

func (e *MountPlanError) Error() string {
	return fmt.Sprintf("%s mount %d at %s: %s", e.Mount.Kind, e.Mount.Index, e.Mount.Path, e.Err)
}

// MountPlan puts every user mount (dir, file, disk, tmpfs) into one list, parents before
// children whatever their kind: sorted by the number of path components, then by path
// (contract 4.6). It refuses a path that is not absolute, has a ".." component or is "/", two
// mounts on the same normalised path, and a file mount with another mount under it.
func (c Config) MountPlan() ([]PlannedMount, error) {
	var plan []PlannedMount
	add := func(kind MountKind, i int, p string) error {
		m := PlannedMount{kind, i, p}
		switch {
		case p == "" || strings.ContainsRune(p, 0):
			return &MountPlanError{Mount: m, Err: "invalid guest path"}
		case !path.IsAbs(p):
			return &MountPlanError{Mount: m, Err: "guest path must be absolute"}
		case strings.Contains("/"+p+"/", "/../"):
			return &MountPlanError{Mount: m, Err: `guest path must not contain ".."`}
		}
		m.Path = path.Clean(p)
		if m.Path == "/" {
			return &MountPlanError{Mount: m, Err: "cannot mount a volume on /"}
		}
		plan = append(plan, m)
		return nil
	}
	for i, m := range c.DirMounts {
		if err := add(MountKindDir, i, m.Path); err != nil {
			return nil, err
		}
	}
	for i, m := range c.FileMounts {
		if err := add(MountKindFile, i, m.Path); err != nil {
			return nil, err
		}
	}
	for i, m := range c.DiskMounts {
		if err := add(MountKindDisk, i, m.Path); err != nil {
			return nil, err
		}
	}
	for i, m := range c.Tmpfs {
		if err := add(MountKindTmpfs, i, m.Path); err != nil {
			return nil, err
		}
	}
	byPath := make(map[string]int, len(plan))
	for i, m := range plan {
		if j, dup := byPath[m.Path]; dup {
			return nil, &MountPlanError{Mount: m, Other: &plan[j], Err: "multiple volumes cannot mount the same guest path"}
		}
		byPath[m.Path] = i
	}
	for _, m := range plan { // a file mount must not be an ancestor of another mount
		for p := path.Dir(m.Path); p != "/"; p = path.Dir(p) {
			if j, ok := byPath[p]; ok && plan[j].Kind == MountKindFile {
				return nil, &MountPlanError{Mount: plan[j], Other: &m, Err: "file mount cannot contain another mount"}
			}
		}
	}
	sort.SliceStable(plan, func(i, j int) bool {
		di, dj := strings.Count(plan[i].Path, "/"), strings.Count(plan[j].Path, "/")
		if di != dj {
			return di < dj
		}
		return plan[i].Path < plan[j].Path
	})
	return plan, nil
}

// checkPlan runs the plan's checks on a bootstrap configuration, naming the payload field.
func checkPlan(c Config) error {
	_, err := c.MountPlan()
	if pe, ok := err.(*MountPlanError); ok {
		return fmt.Errorf("%s: %s", bootstrapField(pe.Mount), planReason(pe))
	}
	return err
}

func planReason(e *MountPlanError) string {
	if e.Other != nil {
		return fmt.Sprintf("%s (%s, %s)", e.Err, e.Mount.Path, bootstrapField(*e.Other))
	}
	return fmt.Sprintf("%s (%s)", e.Err, e.Mount.Path)
}

func bootstrapField(m PlannedMount) string {
	switch m.Kind {
	case MountKindDir:
		return fmt.Sprintf("dir_mounts[%d].guest_path", m.Index)
	case MountKindFile:
		return fmt.Sprintf("file_mounts[%d].guest_path", m.Index)
	case MountKindDisk:
		return fmt.Sprintf("disk_mounts[%d].guest_path", m.Index)
	}
	return fmt.Sprintf("tmpfs_mounts[%d].path", m.Index)
}
