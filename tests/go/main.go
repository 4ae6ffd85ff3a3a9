// svidverify checks a Lanyard X.509-SVID with Go's crypto/x509, the verifier most SPIFFE
// tooling (go-spiffe, SPIRE, Envoy's Go control planes) relies on. Standard library only.
//
// Usage: svidverify -bundle bundle.pem -cert cert.pem [-roles-oid 1.3.9999.7781.1] [-hostname H]
//
// It parses the chain (Go refuses certificates with any OID arc of 2^28 or more), verifies the
// leaf against the bundle for ExtKeyUsageClientAuth and, separately, ExtKeyUsageServerAuth, and
// decodes the roles extension as a DER SEQUENCE OF UTF8String. On success it prints
//
//	uri=<the one URI SAN>
//	roles=<comma-separated roles>
//	dns=<comma-separated DNS SANs>   (only when there are some)
//	ip=<comma-separated IP SANs>     (only when there are some)
//
// With -hostname it also checks x509.Certificate.VerifyHostname (what Go's TLS client does
// with ServerName), so a name the leaf does not carry fails.
//
// and exits 0; on any failure it prints the reason to stderr and exits 1.
package main

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

func main() {
	bundlePath := flag.String("bundle", "", "PEM file of CA certificates to trust")
	certPath := flag.String("cert", "", "PEM file: leaf first, then intermediates")
	oidText := flag.String("roles-oid", "1.3.9999.7781.1", "OID of the roles extension")
	hostname := flag.String("hostname", "", "also check VerifyHostname for this DNS name or IP")
	flag.Parse()
	if err := run(*bundlePath, *certPath, *oidText, *hostname); err != nil {
		fmt.Fprintln(os.Stderr, "svidverify:", err)
		os.Exit(1)
	}
}

func run(bundlePath, certPath, oidText, hostname string) error {
	if bundlePath == "" || certPath == "" {
		return errors.New("-bundle and -cert are required")
	}
	rolesOID, err := parseOID(oidText)
	if err != nil {
		return err
	}
	anchors, err := readCerts(bundlePath)
	if err != nil {
		return err
	}
	chain, err := readCerts(certPath)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	for _, c := range anchors {
		roots.AddCert(c)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	leaf := chain[0]
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		opts := x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}
		if _, err := leaf.Verify(opts); err != nil {
			return fmt.Errorf("verify for %s: %w", usageName(usage), err)
		}
	}
	if leaf.IsCA || !leaf.BasicConstraintsValid {
		return errors.New("leaf must carry basicConstraints CA=false")
	}
	if len(leaf.URIs) != 1 {
		return fmt.Errorf("want exactly one URI SAN, got %d", len(leaf.URIs))
	}
	if n := len(leaf.EmailAddresses); n != 0 {
		return fmt.Errorf("leaf carries %d email SANs", n)
	}
	if hostname != "" {
		if err := leaf.VerifyHostname(hostname); err != nil {
			return fmt.Errorf("VerifyHostname: %w", err)
		}
	}
	if leaf.URIs[0].Scheme != "spiffe" {
		return fmt.Errorf("URI SAN %s is not a SPIFFE ID", leaf.URIs[0])
	}
	roles, err := readRoles(leaf, rolesOID)
	if err != nil {
		return err
	}
	fmt.Printf("uri=%s\n", leaf.URIs[0])
	fmt.Printf("roles=%s\n", strings.Join(roles, ","))
	ips := make([]string, 0, len(leaf.IPAddresses))
	for _, ip := range leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if len(leaf.DNSNames) > 0 {
		fmt.Printf("dns=%s\n", strings.Join(leaf.DNSNames, ","))
	}
	if len(ips) > 0 {
		fmt.Printf("ip=%s\n", strings.Join(ips, ","))
	}
	return nil
}

// readRoles decodes the roles extension; absent means no roles.
func readRoles(leaf *x509.Certificate, oid asn1.ObjectIdentifier) ([]string, error) {
	for _, ext := range leaf.Extensions {
		if !ext.Id.Equal(oid) {
			continue
		}
		if ext.Critical {
			return nil, errors.New("roles extension must not be critical")
		}
		var items []asn1.RawValue
		rest, err := asn1.Unmarshal(ext.Value, &items)
		if err != nil {
			return nil, fmt.Errorf("roles extension is not a DER SEQUENCE: %w", err)
		}
		if len(rest) != 0 {
			return nil, errors.New("roles extension has trailing bytes")
		}
		roles := make([]string, 0, len(items))
		for i, it := range items {
			if it.Class != asn1.ClassUniversal || it.Tag != asn1.TagUTF8String || it.IsCompound {
				return nil, fmt.Errorf("roles item %d is not a UTF8String (class %d tag %d)", i, it.Class, it.Tag)
			}
			roles = append(roles, string(it.Bytes))
		}
		if !sort.StringsAreSorted(roles) {
			return nil, fmt.Errorf("roles are not sorted: %v", roles)
		}
		return roles, nil
	}
	return nil, nil
}

func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no certificates", path)
	}
	return out, nil
}

func parseOID(s string) (asn1.ObjectIdentifier, error) {
	var oid asn1.ObjectIdentifier
	for _, part := range strings.Split(s, ".") {
		n, err := strconv.Atoi(part)
		if err != nil {
			return nil, fmt.Errorf("bad OID %q", s)
		}
		oid = append(oid, n)
	}
	return oid, nil
}

func usageName(u x509.ExtKeyUsage) string {
	if u == x509.ExtKeyUsageClientAuth {
		return "ClientAuth"
	}
	return "ServerAuth"
}
