module lanyard.dev/tests/svidverify

go 1.19
